"""`leo-mini demo`: LEO-MINI-Smol trained on easy-vqa (assembled offline from installed parts and the shipped trained
weights) through `pipeline("image-text-to-text")`, or a random preset model through `generate`."""

import json
import os
import shutil
import time
from pathlib import Path

import torch

from .folders import require_path
from .training.adapter_weights import adapter_metadata, load_adapter_weights, sha256_of

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS = ASSETS / "leo-mini-smol-easyvqa.safetensors"
# Bumped when the demo checkpoint is built differently, so cached ones are rebuilt (2: its tokenizer saves
# padding_side="left"; 3: MMoE layers hold their base linear as `base_linear`, and the folder has a model card).
DEMO_BUILD = 3
DEMO_QUESTIONS = ASSETS / "demo" / "questions.json"
REDUCTION_NAMES = {"cotr": "CoTR", "avg_pool": "average pooling", "none": "resampling (no reduction)"}


def demo_config_overrides(path: Path = DEMO_WEIGHTS) -> dict:
    """The `LeoMiniConfig` options the shipped weights were trained with."""
    return json.loads(adapter_metadata(path)["config"])


def default_cache_dir() -> Path:
    return Path(os.environ.get("LEO_MINI_CACHE", Path.home() / ".cache" / "leo-mini-hf"))


def build_demo_checkpoint(folder: Path, progress=None) -> Path:
    """LEO-MINI-Smol from the installed pretrained packages + the shipped trained weights, saved to `folder`."""
    from .conversion.smol import SMOL_CARD, assemble_leo_mini_smol, convert_smol_parts
    from .folders import write_folder_atomically
    from .hub.checkpoint_folder import save_for_hub
    from .hub.model_card import EASY_VQA

    def step(message):
        if progress is not None:
            progress.set_description(message)
            progress.update(1)

    def write(staging: Path) -> None:
        parts = folder.parent / "parts"
        step("converting SmolLM2 (GGUF) and MobileNetV2 (torchvision)")
        convert_smol_parts(parts)
        step("assembling LEO-MINI-Smol")
        torch.manual_seed(0)
        model, processor = assemble_leo_mini_smol(parts, **demo_config_overrides())
        step("loading the trained CoTR / projector / MMoE weights")
        load_adapter_weights(model, DEMO_WEIGHTS)
        step("saving the checkpoint")
        save_for_hub(model, processor, staging, card={**SMOL_CARD, "datasets": [EASY_VQA]})
        (staging / "adapter.sha256").write_text(demo_build_marker())

    return write_folder_atomically(folder, write)


def demo_build_marker() -> str:
    """What `adapter.sha256` holds in a demo checkpoint built by this version: the weights' digest and the build."""
    return f"{sha256_of(DEMO_WEIGHTS)} build {DEMO_BUILD}"


def demo_checkpoint(progress=None) -> Path:
    """The cached demo checkpoint, rebuilt when the shipped weights or the way it is built change. A folder there that
    this package did not write (no marker) is never deleted: it is refused with a message."""
    folder = default_cache_dir() / "leo-mini-smol-easyvqa"
    marker = folder / "adapter.sha256"
    if folder.is_dir() and any(folder.iterdir()) and not marker.is_file():
        raise ValueError(f"{folder} holds files leo-mini-hf did not write; move them away, or set LEO_MINI_CACHE to "
                         "another folder for the demo checkpoint")
    if marker.is_file() and marker.read_text() != demo_build_marker():
        shutil.rmtree(folder)  # our own cache (its marker says so), built from shipped files: safe to rebuild
    if not folder.exists() or not any(folder.iterdir()):
        build_demo_checkpoint(folder, progress)
    return folder


def bundled_questions() -> list[dict]:
    return [dict(q, image=str(DEMO_QUESTIONS.parent / q["image"])) for q in json.loads(DEMO_QUESTIONS.read_text())]


def question_chat(item: dict) -> list[dict]:
    """One {"image", "question"} item as a single user turn: the image file, then the question."""
    return [{"role": "user", "content": [{"type": "image", "path": item["image"]},
                                         {"type": "text", "text": item["question"]}]}]


def bundled_chat_samples() -> list[dict]:
    """The bundled questions as chat samples ({"messages", "answer"}), as `easyvqa.evaluation` reads them."""
    return [{"messages": question_chat(item), "answer": item["answer"]} for item in bundled_questions()]


def run_trained_demo(model_dir: str | None, image: str | None, question: str | None, max_new_tokens: int,
                     num_visual_tokens: int | None = None) -> None:
    """Answer the bundled easy-vqa test questions (or `question` about `image`), printing each answer, the visual
    tokens before and after CoTR (`num_visual_tokens`: an elastic model's budget), and the time per answer."""
    from tqdm.auto import tqdm
    from transformers import pipeline

    if bool(image) != bool(question):
        raise ValueError("give --image and --question together")
    if not model_dir and not DEMO_WEIGHTS.is_file():
        raise ValueError(f"the trained weights {DEMO_WEIGHTS.name} are not in this install; run "
                         "`leo-mini demo --preset tiny` for the random tiny model")
    folder = require_path(model_dir, "The model") if model_dir else None
    with tqdm(total=5, desc="preparing LEO-MINI-Smol", unit="step") as progress:
        folder = folder or demo_checkpoint(progress)
        progress.set_description("loading the pipeline")
        pipe = pipeline("image-text-to-text", model=str(folder))
        progress.update(progress.total - progress.n)
    model = pipe.model
    pipe.processor.budgets_per_text(num_visual_tokens, 1)  # a budget the model lacks is refused before any work
    experts = model.vision_experts
    if model_dir:
        print(f"LEO-MINI checkpoint {folder}: {model.config.text_config.model_type} LLM + "
              f"{', '.join(type(expert.model).__name__ for expert in experts)}")
    else:
        print(f"LEO-MINI-Smol ({folder}): SmolLM2-135M-Instruct + MobileNetV2, trained on easy-vqa "
              f"({adapter_metadata(DEMO_WEIGHTS).get('steps', '?')} steps)")
    print(f"visual tokens per image: {sum(expert.num_tokens for expert in experts)} from the "
          f"expert{'s' if len(experts) > 1 else ''} -> {num_visual_tokens or model.config.num_image_tokens} after "
          f"{REDUCTION_NAMES[model.config.token_reduction]}{budgets_note(model.config)}")
    questions = [{"image": image, "question": question, "answer": None}] if image else bundled_questions()
    processor_kwargs = {} if num_visual_tokens is None else {"num_visual_tokens": num_visual_tokens}
    correct = 0
    for item in questions:
        chat = question_chat(item)
        started = time.perf_counter()
        output = pipe(text=chat, max_new_tokens=max_new_tokens, return_full_text=False,
                      generate_kwargs={"do_sample": False}, processor_kwargs=processor_kwargs)
        seconds = time.perf_counter() - started
        answer = output[0]["generated_text"].strip()
        verdict = ""
        if item["answer"] is not None:
            hit = answer.lower().strip(".") == item["answer"]
            correct += hit
            verdict = f"  (expected {item['answer']}: {'right' if hit else 'WRONG'})"
        print(f"{Path(item['image']).name}: {item['question']} -> {answer}{verdict}  [{seconds:.2f} s]")
    if not image:
        print(f"{correct}/{len(questions)} bundled questions answered correctly")


def budgets_note(config) -> str:
    """" (elastic: budgets [1, 4, 16])" for an elastic model, else ""."""
    return f" (elastic: budgets {config.cotr_budgets})" if config.cotr_budgets is not None else ""


def run_random_demo(preset: str, seed: int, max_new_tokens: int, num_visual_tokens: int | None = None) -> None:
    """Build a random model from a preset and run one image + prompt through `generate` (`num_visual_tokens`: a
    budget of an elastic preset)."""
    from .modeling import LeoMiniForConditionalGeneration
    from .presets import preset_config
    from .processor.processing_leo_mini import check_visual_token_budgets

    torch.manual_seed(seed)
    config = preset_config(preset)
    started = time.perf_counter()
    model = LeoMiniForConditionalGeneration(config).eval()
    print(f"built random '{preset}' LEO-MINI in {time.perf_counter() - started:.2f} s "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")

    experts = model.vision_experts
    for index, expert in enumerate(experts):
        print(f"  expert {index}: {type(expert.model).__name__:<24} {expert.num_tokens:>5} tokens x {expert.hidden_size}")
    tokens_before = sum(expert.num_tokens for expert in experts)
    num_visual_tokens = num_visual_tokens or config.num_image_tokens
    check_visual_token_budgets(num_visual_tokens, 1, config.visual_token_budgets, config.cotr_budgets is not None)
    print(f"visual tokens per image: {tokens_before} from the experts -> {num_visual_tokens} after "
          f"{REDUCTION_NAMES[config.token_reduction]}{budgets_note(config)}")

    image = torch.randn(1, 3, config.image_size, config.image_size)
    prompt = [config.text_config.bos_token_id or 0] + [config.image_token_id] * num_visual_tokens + [10, 11, 12]
    input_ids = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, pixel_values=image, max_new_tokens=max_new_tokens,
                                   do_sample=False)
    print(f"generated token ids (random weights): {generated[0, input_ids.shape[1]:].tolist()} "
          f"in {time.perf_counter() - started:.2f} s")
