"""Exact-match VQA evaluation (easy-vqa and its mosaics) with batched greedy generation, and prefill timing."""

import random
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dataset import evaluation_subset, normalise_answer, question_type
from .registry import EVALUATION_DATASETS, evaluation_dataset


def prompt_inputs(processor, samples: list[dict], num_visual_tokens: int | None = None) -> dict:
    """Model inputs (input_ids, attention_mask, pixel_values; text_condition_mask for a model whose CoTR reads the
    user's words only) for chat samples' prompts: assistant turns dropped, the generation prompt added, padded on the
    left; num_visual_tokens: an elastic model's budget (default its largest)."""
    conversations = [[m for m in s["messages"] if m["role"] != "assistant"] for s in samples]
    processor_kwargs = {"padding": True, "padding_side": "left"}
    if num_visual_tokens is not None:
        processor_kwargs["num_visual_tokens"] = num_visual_tokens
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs=processor_kwargs)
    return {k: v for k, v in inputs.items() if k in processor.model_input_names}


@torch.no_grad()
def answer_questions(model, processor, samples: list[dict], batch_size: int = 16, max_new_tokens: int = 5,
                     num_visual_tokens: int | None = None, progress: bool = False) -> list[str]:
    """Greedy answers for chat samples (the assistant turn, if any, is dropped), at `num_visual_tokens` per image;
    with `progress`, a progress bar (on stderr) counts the questions answered."""
    answers = []
    with tqdm(total=len(samples), desc="answering", unit="question", disable=not progress) as bar:
        for start in range(0, len(samples), batch_size):
            inputs = prompt_inputs(processor, samples[start:start + batch_size], num_visual_tokens)
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            answers += processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            bar.update(len(inputs["input_ids"]))
    return answers


def _image_blocks(sample: dict) -> list[dict]:
    return [block for message in sample["messages"] if isinstance(message["content"], list)
            for block in message["content"] if block.get("type") == "image"]


def with_images_swapped(samples: list[dict], seed: int = 0) -> list[dict]:
    """The same questions, each shown the images of another sample (a seeded permutation without fixed points).

    Accuracy on these is what a model answers from the question alone: a control for answers that ignore the image.
    """
    if len(samples) < 2:
        raise ValueError("swapping images needs at least 2 samples")
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    donors = {order[i]: order[(i + 1) % len(order)] for i in range(len(order))}  # one cycle: nobody keeps its own
    swapped = []
    for index, sample in enumerate(samples):
        own, given = _image_blocks(sample), _image_blocks(samples[donors[index]])
        if len(own) != len(given):
            raise ValueError("swapping images needs the same number of images in every sample")
        replacement = {id(block): dict(new) for block, new in zip(own, given)}
        messages = [{**message, "content": [replacement.get(id(block), block) for block in message["content"]]}
                    if isinstance(message["content"], list) else message for message in sample["messages"]]
        swapped.append({**sample, "messages": messages})
    return swapped


def evaluate_vqa(model, processor, dataset, limit: int | None = None, batch_size: int = 16, seed: int = 0,
                 swap_images: bool = False, num_visual_tokens: int | None = None, progress: bool = False) -> dict:
    """Exact-match accuracy overall and per question type, on a seeded subset of `dataset`.

    swap_images: show each question another sample's image (`with_images_swapped`): the question-only control.
    num_visual_tokens: an elastic model's budget per image (default its largest).
    """
    model.eval()
    indices = evaluation_subset(dataset, limit, seed)
    if not indices:
        raise ValueError("No questions to evaluate: the dataset or its sample is empty")
    samples = [dataset[i] for i in indices]
    if swap_images:
        samples = with_images_swapped(samples, seed)
    started = time.perf_counter()
    predictions = answer_questions(model, processor, samples, batch_size, num_visual_tokens=num_visual_tokens,
                                   progress=progress)
    seconds = time.perf_counter() - started
    correct, total = defaultdict(int), defaultdict(int)
    for sample, prediction in zip(samples, predictions):
        kind = sample.get("question_type") or question_type(sample["answer"])
        total[kind] += 1
        correct[kind] += int(normalise_answer(prediction) == sample["answer"])
    per_type = {kind: correct[kind] / total[kind] for kind in sorted(total)}
    return {
        "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
        "per_type": per_type,
        "count": sum(total.values()),
        "count_per_type": dict(sorted(total.items())),
        "seconds": seconds,
    }


@torch.no_grad()
def prefill_seconds(model, processor, sample: dict, repeats: int = 10, num_visual_tokens: int | None = None) -> float:
    """Median time of one prefill forward (batch 1) of `sample`'s prompt, after a warm-up."""
    inputs = prompt_inputs(processor, [sample], num_visual_tokens)
    model.eval()
    model(**inputs, logits_to_keep=1)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def evaluate_checkpoint(model_dir, dataset_name: str = "easy-vqa", split: str = "test", limit: int | None = None,
                        seed: int = 0, batch_size: int = 16, swap_images: bool = False,
                        num_visual_tokens: int | None = None, output=None) -> dict:
    """`leo-mini eval`: exact-match accuracy of a checkpoint on easy-vqa or a seeded mosaic set ("mosaic-2x2",
    "mosaic-3x3": questions about a cell; "object-2x2", "object-3x3": questions naming a tile by its content;
    "object-distinct-2x2", "object-distinct-3x3": the same questions, three objects of distinct shapes and colours;
    `limit` questions, default 400), at `num_visual_tokens` per image (an elastic model's budget); prints the JSON
    result and a per-type table, and writes the result with what was evaluated to `output` (a JSON file that
    `leo-mini export --eval-results` turns into the model card's model-index)."""
    import json

    from ..folders import require_path
    from ..modeling import LeoMiniForConditionalGeneration
    from ..processor import LeoMiniProcessor

    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive number of questions, got {limit}")
    dataset = evaluation_dataset(dataset_name, split, size=limit or 400, seed=seed)
    if not EVALUATION_DATASETS[dataset_name].sampled:
        limit = None  # the seeded set is the sample
    model_dir = require_path(model_dir, "The model")
    model = LeoMiniForConditionalGeneration.from_pretrained(model_dir)
    processor = LeoMiniProcessor.from_pretrained(model_dir)
    processor.budgets_per_text(num_visual_tokens, 1)  # a budget the model lacks is refused before any work
    result = evaluate_vqa(model, processor, dataset, limit=limit, batch_size=batch_size, seed=seed,
                          swap_images=swap_images, num_visual_tokens=num_visual_tokens, progress=True)
    print(json.dumps(result, indent=2))
    if output is not None:
        setting = {"dataset": dataset_name, "split": split, "limit": limit, "seed": seed, "swap_images": swap_images,
                   "num_visual_tokens": num_visual_tokens}
        Path(output).write_text(json.dumps({**setting, **result}, indent=2) + "\n")
    print("\n| question type | accuracy | questions |\n|---|---|---|")
    for kind, accuracy in result["per_type"].items():
        print(f"| {kind} | {accuracy:.3f} | {result['count_per_type'][kind]} |")
    print(f"| all | {result['accuracy']:.3f} | {result['count']} |")
    return result
