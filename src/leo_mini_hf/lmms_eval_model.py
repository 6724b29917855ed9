"""LEO-MINI as an lmms-eval model: `lmms-eval --model leo_mini --model_args pretrained=DIR --tasks ...`.

Registered through the `lmms_eval.models` entry-point group (`MANIFEST`), so installing leo-mini-hf[eval] is enough.
Prompts are built exactly as `leo-mini eval` builds them (the chat template, one image block per visual, then the
task's text), so the two paths score a question alike.
"""

import warnings

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image

from .dtypes import dtype_named
from .easyvqa.evaluation import prompt_inputs
from .modeling import LeoMiniForConditionalGeneration
from .processor import LeoMiniProcessor

# generation options lmms-eval tasks set that `generate` takes as they are; `until` becomes stop strings
GENERATION_OPTIONS = ("max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams",
                      "repetition_penalty")
DEFAULT_MAX_NEW_TOKENS = 128


class LeoMiniLmms(lmms):
    """lmms-eval model `leo_mini`: a LEO-MINI checkpoint folder or Hub repo id (`pretrained=`), greedy by default.

    model_args: pretrained, dtype (float32 | bfloat16 | float16), batch_size, device, max_new_tokens (used when a
    task sets none), num_visual_tokens (an elastic model's budget per image; default its largest).
    """

    is_simple = True

    def __init__(self, pretrained: str, dtype: str = "float32", batch_size: int | str = 1, device: str | None = None,
                 max_new_tokens: int | str = DEFAULT_MAX_NEW_TOKENS, num_visual_tokens: int | str | None = None,
                 max_batch_size=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"leo_mini: unknown model_args {sorted(unknown)}; it takes pretrained, dtype, "
                             "batch_size, device, max_new_tokens, num_visual_tokens")
        torch_dtype = dtype_named(dtype, "leo_mini: dtype")
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.default_max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = LeoMiniForConditionalGeneration.from_pretrained(pretrained, dtype=torch_dtype)
        self.model.to(self.device).eval()
        self.processor = LeoMiniProcessor.from_pretrained(pretrained)
        self.num_visual_tokens = None
        if num_visual_tokens is not None:
            self.num_visual_tokens = _positive_int(num_visual_tokens, "num_visual_tokens")
            self.processor.budgets_per_text(self.num_visual_tokens, 1)  # refuses a budget the model lacks
        self.tokenizer = self.processor.tokenizer
        self._warned_options: set[str] = set()

    # ---- requests → chat samples ----------------------------------------------------------------------------

    def _sample(self, context: str, doc_to_visual, doc_id, task: str, split: str) -> dict:
        """One request as a chat sample: an image block per visual, then the task's text."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        images = []
        for visual in visuals or []:
            if not isinstance(visual, Image.Image):
                raise ValueError(f"leo_mini takes images only; task {task!r} gave a {type(visual).__name__} "
                                 "(video or audio tasks need another model)")
            images.append({"type": "image", "image": visual.convert("RGB")})
        return {"messages": [{"role": "user", "content": [*images, {"type": "text", "text": context}]}]}

    def _inputs(self, samples: list[dict]) -> dict:
        return {name: tensor.to(self.device) for name, tensor in prompt_inputs(self.processor, samples,
                                                                                self.num_visual_tokens).items()}

    # ---- generate_until --------------------------------------------------------------------------------------

    def generate_until(self, requests) -> list[str]:
        """Batched (left-padded) generation; requests are grouped by their generation options, answers cut at the
        first of the task's `until` strings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            options, until = self._generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                samples = [self._sample(requests[i].args[0], *requests[i].args[2:]) for i in batch]
                inputs = self._inputs(samples)
                with torch.inference_mode():
                    generated = self.model.generate(**inputs, **options, stop_strings=until or None,
                                                    tokenizer=self.tokenizer)
                texts = self.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    answers[i] = _cut_at(text, until)
        return answers

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """The task's generation kwargs → (`generate` options, stop strings). Greedy unless the task samples."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        options = {name: gen_kwargs.pop(name) for name in GENERATION_OPTIONS if name in gen_kwargs}
        for name in sorted(set(gen_kwargs) - self._warned_options):
            warnings.warn(f"leo_mini ignores the generation option {name}={gen_kwargs[name]!r}")
            self._warned_options.add(name)
        options.setdefault("max_new_tokens", self.default_max_new_tokens)
        temperature = options.pop("temperature", 0) or 0
        options["do_sample"] = bool(options.get("do_sample", False) or temperature > 0)
        if options["do_sample"]:
            options["temperature"] = temperature or 1.0
        else:
            options.pop("top_p", None)
            options.pop("top_k", None)
        return options, until

    # ---- loglikelihood ---------------------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """(sum of the continuation tokens' log-probabilities, whether greedy decoding gives the continuation).

        From the logits, never `outputs.loss` (which adds the MMoE balance loss). The continuation goes in as
        labels, so CoTR and the router are conditioned on the prompt only, as in training.
        """
        results = []
        for start in range(0, len(requests), self.batch_size):
            results += self._loglikelihood_batch(requests[start:start + self.batch_size])
        return results

    def _loglikelihood_batch(self, requests) -> list[tuple[float, bool]]:
        rows, pixel_values, condition_masks = [], [], []
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            inputs = self._inputs([self._sample(context, doc_to_visual, doc_id, task, split)])
            target_ids = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            if len(target_ids) == 0:
                raise ValueError(f"leo_mini: the continuation {continuation!r} has no tokens")
            rows.append((inputs["input_ids"][0], target_ids.to(self.device)))
            if "pixel_values" in inputs:
                pixel_values.append(inputs["pixel_values"])
            if "text_condition_mask" in inputs:  # a model whose CoTR reads the user's words only
                condition_masks.append(inputs["text_condition_mask"][0])
        length = max(len(prompt) + len(target) for prompt, target in rows)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=self.device)
        labels = torch.full_like(input_ids, -100)
        attention_mask = torch.zeros_like(input_ids)
        for row, (prompt, target) in enumerate(rows):  # right padding: every prompt starts at position 0
            end = len(prompt) + len(target)
            input_ids[row, :end] = torch.cat([prompt, target])
            labels[row, len(prompt):end] = target
            attention_mask[row, :end] = 1
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if pixel_values:
            inputs["pixel_values"] = torch.cat(pixel_values)
        if condition_masks:  # the prompt's marks; the continuation and the padding are never the user's words
            inputs["text_condition_mask"] = torch.zeros_like(input_ids)
            for row, mask in enumerate(condition_masks):
                inputs["text_condition_mask"][row, :len(mask)] = mask
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        results = []
        for row, (prompt, target) in enumerate(rows):
            predicting = logits[row, len(prompt) - 1:len(prompt) + len(target) - 1]  # position t predicts t + 1
            log_probs = F.log_softmax(predicting, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            results.append((log_probs.sum().item(), bool((predicting.argmax(dim=-1) == target).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "leo_mini answers single-round tasks (generate_until and loglikelihood), not lmms-eval's multi-round "
            "tasks. For a conversation, pass the whole chat to processor.apply_chat_template and call "
            "model.generate yourself (see the README's usage)."
        )


def _positive_int(value, name: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise ValueError(f"leo_mini: {name} must be a positive integer, got {value!r}")
    return number


def _cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


MANIFEST = ModelManifest(model_id="leo_mini", simple_class_path="leo_mini_hf.lmms_eval_model.LeoMiniLmms",
                         aliases=("leo-mini",))
