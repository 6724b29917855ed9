"""LEO-MINI web demo: ask about an image, watch the answer stream in, and see where CoTR looked.

Self-contained (gradio, torch, numpy, PIL and transformers only), so `leo-mini space` copies this file into a Hugging
Face Space unchanged; `leo-mini serve` runs the same app locally. Private by construction: Gradio analytics off,
system fonts only (no font CDN), no share link; the model loads from a local folder or a Hub repo id, as given.
"""

import math
import os
import threading
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # must be set before gradio is imported

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForImageTextToText,
    AutoProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

MAX_QUESTION_CHARACTERS = 1000
MAX_UPLOAD_SIZE = "25mb"  # Gradio refuses larger uploads; a 64 MP image (the processor's bound) fits compressed
CACHE_CLEANUP = (3600, 3600)  # Gradio deletes the app's uploads older than an hour, hourly, and all at shutdown
NOT_AN_UPLOAD = "Upload the image to this page first: the app reads only images uploaded to it or its examples."
QUESTION_SLOT = "\x00LEO-MINI question\x00"  # where the chat template puts the question; never typed (NUL)
REDUCTIONS = {"cotr": "CoTR", "avg_pool": "average pooling", "none": "no reduction"}
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # local fonts: nothing from a CDN
                          font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


class StopWhenCancelled(StoppingCriteria):
    """Stops a generation once its request is cancelled (the page closed, the API call cancelled)."""

    def __init__(self, cancelled: threading.Event):
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.cancelled.is_set(), dtype=torch.bool, device=input_ids.device)


def load_model(model_id_or_folder: str):
    """(model, processor) from a LEO-MINI checkpoint folder or Hub repo id, with its remote code."""
    processor = AutoProcessor.from_pretrained(model_id_or_folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_id_or_folder, trust_remote_code=True).eval()
    return model, processor


class LeoMiniChat:
    """Answers one question about one image as a stream of (answer so far, statistics, None); the last carries the
    CoTR heat map."""

    def __init__(self, model, processor, max_new_tokens: int = 32):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        experts = model.vision_experts
        self.tokens_before = sum(expert.num_tokens for expert in experts)
        self.tokens_after = model.config.num_image_tokens  # the default budget: the largest
        self.budgets = model.config.visual_token_budgets  # elastic: several
        self.reduction = REDUCTIONS.get(model.config.token_reduction, model.config.token_reduction)

    def answer(self, image, question, num_visual_tokens=None):
        """Gradio event handler (unprocessed inputs: the image's upload record or path, the question text, and for an
        elastic model the visual-token budget).

        The generation runs in a worker thread and streams its text here. Closing this generator (Gradio does when
        the request is cancelled) stops the generation within one token and waits for the worker: a request never
        leaves a generation running behind it, so the app runs at most its concurrency limit of them."""
        started = time.perf_counter()
        budget = self.tokens_after if num_visual_tokens in (None, "") else num_visual_tokens
        try:  # the page's dropdown sends the budget as a string
            budget = self.processor.budgets_per_text(int(budget) if str(budget).isdigit() else budget, 1)[0]
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error))
        inputs = self._inputs(image, question, budget)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=300)
        cancelled = threading.Event()
        failure: list[BaseException] = []

        def generate():
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, streamer=streamer, max_new_tokens=self.max_new_tokens,
                                        do_sample=False,
                                        stopping_criteria=StoppingCriteriaList([StopWhenCancelled(cancelled)]))
            except BaseException as error:  # reported in the page; the stream must still end
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=generate, name="leo-mini-generate", daemon=True)
        worker.start()
        text, first_token_seconds = "", None
        try:
            for piece in streamer:
                if first_token_seconds is None:
                    first_token_seconds = time.perf_counter() - started
                text += piece
                yield text, self._statistics(budget, first_token_seconds, None), None
        finally:  # also when the request is cancelled (GeneratorExit at a yield)
            cancelled.set()
            worker.join()
        if failure:
            raise gr.Error(f"Generation failed: {failure[0]}")
        # The heat map is sent once, with the finished answer: Gradio rewrites an image's cached file on every send,
        # and a rewrite while the browser still downloads the previous send cuts that download short.
        heat_map = self.heat_map(inputs["pixel_values"][0], self.reduction_weights(inputs))
        yield text, self._statistics(budget, first_token_seconds, time.perf_counter() - started), heat_map

    def reduction_weights(self, inputs: dict) -> list[torch.Tensor] | None:
        """The reducer's weights for the first image, per expert (1, k, N_i), from one more prefill of the prompt
        (`output_reduction_weights`; `generate` keeps no forward's outputs); None for a reducer without learned
        weights (pooling, full tokens)."""
        with torch.inference_mode():
            weights = self.model(**inputs, output_reduction_weights=True, logits_to_keep=1).reduction_weights
        return None if weights is None else [alpha[:1] for alpha in weights]

    def _inputs(self, image, question, budget: int) -> dict:
        """Model inputs, or a gr.Error with a readable reason (no image, an empty question, an unreadable file)."""
        if isinstance(image, dict):
            image = image.get("path")
        if not image:
            raise gr.Error("Upload an image first (PNG, JPEG, WebP, ...).")
        if not isinstance(question, str) or not question.strip():
            raise gr.Error("Type a question about the image.")
        if len(question) > MAX_QUESTION_CHARACTERS:
            raise gr.Error(f"The question is too long ({len(question)} characters; at most "
                           f"{MAX_QUESTION_CHARACTERS}).")
        try:
            question.encode("utf-8")
        except UnicodeEncodeError:
            raise gr.Error("The question holds characters that are not text (an unpaired surrogate); retype it.")
        try:
            with Image.open(image) as opened:
                opened.verify()  # reads the whole file: truncated and non-image files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            raise gr.Error(f"This file is not an image LEO-MINI can read ({type(error).__name__}: {error}).")
        try:
            return self.prompt_inputs(str(image), question.strip(), budget)
        except (OSError, ValueError, TypeError, Image.DecompressionBombError) as error:
            raise gr.Error(f"This image cannot be used: {error}")

    def prompt_inputs(self, image: str, question: str, budget: int) -> dict:
        """The chat prompt for one image and the user's question, with the question tokenized as plain text: what
        the user types is never read as a control token (`<|im_end|>`) or an image placeholder (`<image>`), as
        transformers' `split_special_tokens` does. The template's own parts are tokenized as usual, so an ordinary
        question gives exactly the ids of `processor.apply_chat_template`."""
        chat = [{"role": "user", "content": [{"type": "image", "path": image},
                                             {"type": "text", "text": QUESTION_SLOT}]}]
        before, _, after = self.processor.apply_chat_template(chat, add_generation_prompt=True,
                                                              tokenize=False).partition(QUESTION_SLOT)
        budget_kwargs = {"num_visual_tokens": budget} if len(self.budgets) > 1 else {}
        inputs = self.processor(images=[image], text=before, add_special_tokens=False, **budget_kwargs)
        tokenizer = self.processor.tokenizer
        question_ids = tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        after_ids = tokenizer(after, add_special_tokens=False)["input_ids"]
        pieces = [inputs["input_ids"][0], question_ids, after_ids]
        inputs["input_ids"] = torch.tensor([sum(pieces, [])])
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "text_condition_mask" in inputs:  # a model whose CoTR reads the user's words only: the question's
            inputs["text_condition_mask"] = torch.tensor([[0] * len(pieces[0]) + [1] * len(question_ids)
                                                          + [0] * len(after_ids)])
        inputs["pixel_values"] = torch.as_tensor(np.asarray(inputs["pixel_values"]))
        return dict(inputs)

    def _statistics(self, budget: int, first_token_seconds: float | None, answer_seconds: float | None) -> str:
        parts = [f"**visual tokens: {self.tokens_before} → {budget}** ({self.reduction})"]
        if first_token_seconds is not None:
            parts.append(f"first token after {first_token_seconds:.2f} s")
        if answer_seconds is not None:
            parts.append(f"answer in {answer_seconds:.2f} s")
        return " · ".join(parts)

    def heat_map(self, pixel_values: torch.Tensor, expert_weights: list[torch.Tensor] | None) -> Image.Image | None:
        """The image as the experts saw it, tinted by CoTR's attention: each expert's softmax weights (1, N_V, N)
        averaged over the queries, laid on its token grid, upsampled, averaged over the experts, scaled to its max
        (shown as its square root). pixel_values: (3, S, S) as the processor made them. None without weights."""
        if expert_weights is None:
            return None
        side = pixel_values.shape[-1]
        grids = []
        for weights in expert_weights:
            per_token = weights[0].float().mean(dim=0)
            grid_side = math.isqrt(per_token.numel())
            if grid_side * grid_side != per_token.numel():
                continue  # not a square grid of tokens: nothing to draw for this expert
            grid = per_token.reshape(1, 1, grid_side, grid_side)
            grids.append(torch.nn.functional.interpolate(grid, size=(side, side), mode="bilinear")[0, 0])
        image_processor = self.processor.image_processor
        mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
        std = torch.tensor(image_processor.image_std).view(3, 1, 1)
        picture = (pixel_values.float() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
        if not grids:
            return Image.fromarray((picture * 255).astype(np.uint8))
        heat = torch.stack(grids).mean(dim=0)
        heat = (heat / heat.max().clamp(min=1e-12)).sqrt().numpy()[..., None]  # sqrt: weak attention stays visible
        colour = np.concatenate([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1)  # red → yellow
        blended = picture * (1 - 0.7 * heat) + colour * 0.7 * heat
        return Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8))


def readable_image(image, folders: list[Path]) -> str:
    """The path of an image the app may open: a regular file inside one of `folders` (Gradio's upload folder and the
    examples), symbolic links resolved. Everything else, whatever the path, gets the same gr.Error (NOT_AN_UPLOAD):
    an API call must not learn whether a file on the server exists or what it holds. `image`: the handler's
    unprocessed input, an upload record ({"path": ...}), a path, or None."""
    path = image.get("path") if isinstance(image, dict) else image
    if not path:
        raise gr.Error("Upload an image first (PNG, JPEG, WebP, ...).")
    if not isinstance(path, str) or "\x00" in path:
        raise gr.Error(NOT_AN_UPLOAD)
    resolved = Path(os.path.realpath(path))
    if not any(resolved.is_relative_to(folder) for folder in folders) or not resolved.is_file():
        raise gr.Error(NOT_AN_UPLOAD)
    return str(resolved)


def build_app(chat: LeoMiniChat, examples: list[list[str]], title: str = "LEO-MINI") -> gr.Blocks:
    """The page: image and question in, streamed answer, token counts and timings, and CoTR's heat map out.

    The handler opens only files uploaded to the app or the bundled examples (`readable_image`); uploads are deleted
    an hour after they arrive and when the server stops (`CACHE_CLEANUP`)."""
    with gr.Blocks(analytics_enabled=False, title=title, delete_cache=CACHE_CLEANUP) as app:
        gr.Markdown(f"# {title}\nAsk about an image. The answer streams in; beside it, how many visual tokens the "
                    f"LLM read ({chat.tokens_before} from the vision experts, {chat.tokens_after} after "
                    f"{chat.reduction}) and where the reduction looked.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", sources=["upload", "clipboard"], elem_id="image")
                question = gr.Textbox(label="Question", placeholder="What shape is in the image?", lines=1,
                                      max_lines=3, elem_id="question")
                inputs = [image, question]
                if len(chat.budgets) > 1:  # an elastic model: the budget is the user's choice, per question
                    inputs.append(gr.Radio([str(k) for k in chat.budgets], value=str(chat.tokens_after),
                                           label="Visual tokens per image (elastic CoTR)", elem_id="budget"))
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
            with gr.Column():
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                statistics = gr.Markdown(elem_id="statistics")
                heat_map = gr.Image(label=f"Where {chat.reduction} looked", type="pil", format="png",
                                    interactive=False, elem_id="heat-map")
        if examples:
            gr.Examples(examples, inputs=[image, question], label="Examples (easy-vqa test images)")
        folders = [Path(os.path.realpath(app.GRADIO_CACHE))]
        folders += sorted({Path(os.path.realpath(image_path)).parent for image_path, _ in examples})

        def answer_upload(image, question, *budget):
            yield from chat.answer(readable_image(image, folders), question, *budget)

        handler = {"fn": answer_upload, "inputs": inputs, "outputs": [answer, statistics, heat_map],
                   "preprocess": False}  # the handler reads the upload itself and explains what it cannot use
        ask.click(**handler, api_name="ask")
        question.submit(**handler, api_visibility="private")
    return app.queue(default_concurrency_limit=1)


def bundled_examples(folder) -> list[list[str]]:
    """[[image path, question], ...] from a folder holding questions.json ([{"image", "question"}, ...])."""
    import json

    folder = Path(folder)
    questions = folder / "questions.json"
    if not questions.is_file():
        return []
    return [[str(folder / item["image"]), item["question"]] for item in json.loads(questions.read_text())]


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, allowed_paths=(), block: bool = True,
           max_file_size: str | int = MAX_UPLOAD_SIZE):
    """Serve the app (no share link, no server-side rendering, errors shown in the page, uploads of at most
    `max_file_size`)."""
    return app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, show_error=True,
                      theme=THEME, allowed_paths=[str(path) for path in allowed_paths], prevent_thread_lock=not block,
                      quiet=True, footer_links=["api"], max_file_size=max_file_size)


def main(model: str, examples_dir: str = "examples", max_new_tokens: int = 32) -> None:
    """A Space's entry point: the model from `model` (Hub repo id or folder), examples from `examples_dir`."""
    chat = LeoMiniChat(*load_model(model), max_new_tokens=max_new_tokens)
    launch(build_app(chat, bundled_examples(examples_dir)), host=os.environ.get("GRADIO_SERVER_NAME", "0.0.0.0"),
           port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")), allowed_paths=[examples_dir])
