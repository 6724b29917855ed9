"""LEO-MINI as an lmms-eval model: `lmms-eval --model leo_mini --model_args pretrained=DIR --tasks ...`.

Registered through the `lmms_eval.models` entry-point group (`MANIFEST`), so installing leo-mini-hf[eval] is enough.
Prompts are built exactly as `leo-mini eval` builds them (the chat template, one image block per visual, then the
task's text), so the two paths score a question alike.
"""

import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from lmms_eval.utils import simple_parse_args_string
from PIL import Image
from tqdm.auto import tqdm

from ..dtypes import dtype_named
from ..easyvqa.evaluation import prompt_inputs
from ..modeling import LeoMiniForConditionalGeneration
from ..processor import LeoMiniProcessor

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

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LeoMiniLmms":
        """As lmms-eval's, but an option given in `--model_args` (e.g. `batch_size=16`) wins over the one lmms-eval
        passes from its own flags (`--batch_size`, default 1), instead of clashing with it."""
        model_args = simple_parse_args_string(arg_string)
        flags = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in model_args}
        return cls(**model_args, **flags)

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
        _check_pretrained(pretrained)
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
        progress = tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            options, until = self._generation_options(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                samples = [self._sample(requests[i].args[0], *requests[i].args[2:]) for i in batch]
                inputs = self._inputs(samples)
                self._check_fits(inputs["input_ids"].shape[1] + options["max_new_tokens"], requests[batch[0]],
                                 "prompt + max_new_tokens")
                with torch.inference_mode():
                    generated = self.model.generate(**inputs, **options, stop_strings=until or None,
                                                    tokenizer=self.tokenizer)
                texts = self.tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1]:],
                                                    skip_special_tokens=True)
                for i, text in zip(batch, texts):
                    answers[i] = _cut_at(text, until)
                progress.update(len(batch))
        progress.close()
        return answers

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """The task's generation kwargs → (`generate` options, stop strings). Greedy unless the task samples."""
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(stop, str) for stop in until):
            raise ValueError(f"leo_mini: until must be a string or a list of strings, got {until!r}")
        until = [stop for stop in until if stop]  # an empty stop string would stop at once
        options = {name: gen_kwargs.pop(name) for name in GENERATION_OPTIONS if name in gen_kwargs}
        for name, minimum in (("max_new_tokens", 1), ("num_beams", 1), ("top_k", 0)):  # YAML may give "5"
            if name in options:
                options[name] = _int_at_least(options[name], name, minimum)
        if "temperature" in options:
            options["temperature"] = _number_in(options["temperature"], "temperature", 0, low_included=True)
        if "top_p" in options:
            options["top_p"] = _number_in(options["top_p"], "top_p", 0, 1)
        if "repetition_penalty" in options:
            options["repetition_penalty"] = _number_in(options["repetition_penalty"], "repetition_penalty", 0)
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
        progress = tqdm(total=len(requests), desc="Model Responding", disable=self.rank != 0)
        for start in range(0, len(requests), self.batch_size):
            results += self._loglikelihood_batch(requests[start:start + self.batch_size])
            progress.update(len(results) - progress.n)
        progress.close()
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
            self._check_fits(inputs["input_ids"].shape[1] + len(target_ids), request, "context + continuation")
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

    def _check_fits(self, num_tokens: int, request, what: str) -> None:
        """A clear error when a request needs more positions than the LLM has (it would run on, past them)."""
        max_positions = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and num_tokens > max_positions:
            _, _, _, doc_id, task, split = request.args
            raise ValueError(f"leo_mini: task {task!r} ({split}, doc {doc_id}): the {what} take {num_tokens} tokens, "
                             f"more than the model's {max_positions} positions (max_position_embeddings); shorten "
                             "the context or lower max_new_tokens")

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "leo_mini answers single-round tasks (generate_until and loglikelihood), not lmms-eval's multi-round "
            "tasks. For a conversation, pass the whole chat to processor.apply_chat_template and call "
            "model.generate yourself (see the README's usage)."
        )


def _int_at_least(value, name: str, minimum: int) -> int:
    """`value` (an int or an integer string) as an int >= minimum, or a clear error."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if isinstance(value, bool) or number < minimum or str(number) != str(value).strip():
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"leo_mini: {name} must be {kind}, got {value!r}")
    return number


def _positive_int(value, name: str) -> int:
    return _int_at_least(value, name, 1)


def _number_in(value, name: str, low: float, high: float | None = None, low_included: bool = False) -> float:
    """`value` (a number or a numeric string) as a float in the interval from `low` to `high`, or a clear error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    above_low = number >= low if low_included else number > low  # False for NaN
    if isinstance(value, bool) or not above_low or (high is not None and not number <= high):
        interval = f"{'[' if low_included else '('}{low}, " + (f"{high}]" if high is not None else "inf)")
        raise ValueError(f"leo_mini: {name} must be a number in {interval}, got {value!r}")
    return number


def _check_pretrained(pretrained) -> None:
    """A missing local folder gets a clear error, not the Hub's "Repo id must be in the form" one."""
    if not isinstance(pretrained, str) or not pretrained:
        raise ValueError(f"leo_mini: pretrained must be a checkpoint folder or a Hub repo id, got {pretrained!r}")
    looks_like_path = pretrained.startswith(("/", ".", "~")) or pretrained.count("/") > 1
    if looks_like_path and not Path(pretrained).expanduser().is_dir():
        raise ValueError(f"leo_mini: pretrained folder not found: {pretrained}")


def _cut_at(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((text.index(stop) for stop in until if stop and stop in text), default=len(text))
    return text[:cut]


MANIFEST = ModelManifest(model_id="leo_mini", simple_class_path="leo_mini_hf.lmms.model.LeoMiniLmms",
                         aliases=("leo-mini",))
