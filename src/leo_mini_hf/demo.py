"""LEO-MINI-Smol trained on easy-vqa: the shipped adapter weights, and the `leo-mini demo` assembly."""

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_WEIGHTS = ASSETS / "leo-mini-smol-easyvqa.safetensors"
TRAINED_PARTS = ("token_reducer.", "multi_modal_projector.", "_lora_", "router.")


def is_trained_part(name: str) -> bool:
    """CoTR, projector, MMoE LoRA experts and routers: what stage-3 training changes (not the pretrained parts)."""
    return any(part in name for part in TRAINED_PARTS)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_adapter_weights(model, path: Path, metadata: dict[str, str]) -> str:
    """Write the trained parts as float16 safetensors (+ a .sha256 file); returns the checksum."""
    state = {name: tensor.detach().to(torch.float16).contiguous()
             for name, tensor in model.state_dict().items() if is_trained_part(name)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    checksum = sha256_of(path)
    path.with_suffix(".sha256").write_text(f"{checksum}  {path.name}\n")
    return checksum


def load_adapter_weights(model, path: Path = DEMO_WEIGHTS) -> None:
    """Load shipped trained parts into an assembled model, after checking the checksum and that every trained
    parameter of the model is covered."""
    expected = path.with_suffix(".sha256").read_text().split()[0]
    if sha256_of(path) != expected:
        raise ValueError(f"{path} does not match its checksum; the file is corrupt or was changed")
    state = load_file(str(path))
    model_state = model.state_dict()
    missing = sorted(name for name in model_state if is_trained_part(name) and name not in state)
    unexpected = sorted(name for name in state if name not in model_state)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict({name: tensor.to(model_state[name].dtype) for name, tensor in state.items()}, strict=False)


def demo_metadata(path: Path = DEMO_WEIGHTS) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def demo_config_overrides(path: Path = DEMO_WEIGHTS) -> dict:
    return json.loads(demo_metadata(path)["config"])


DEMO_QUESTIONS = ASSETS / "demo" / "questions.json"


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("LEO_MINI_CACHE", Path.home() / ".cache" / "leo-mini-hf"))


def build_demo_checkpoint(folder: Path, progress=None) -> Path:
    """LEO-MINI-Smol from the installed pretrained packages + the shipped trained weights, saved to `folder`."""
    from .conversion.hub import save_for_hub, write_folder_atomically
    from .conversion.smol import assemble_leo_mini_smol, convert_smol_parts

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
        load_adapter_weights(model)
        step("saving the checkpoint")
        save_for_hub(model, processor, staging)
        (staging / "adapter.sha256").write_text(sha256_of(DEMO_WEIGHTS))

    return write_folder_atomically(folder, write)


def demo_checkpoint(progress=None) -> Path:
    """The cached demo checkpoint, rebuilt when the shipped weights change."""
    import shutil

    folder = default_cache_dir() / "leo-mini-smol-easyvqa"
    marker = folder / "adapter.sha256"
    if folder.exists() and (not marker.is_file() or marker.read_text() != sha256_of(DEMO_WEIGHTS)):
        shutil.rmtree(folder)  # our own cache, built from shipped files: safe to rebuild
    if not folder.exists():
        build_demo_checkpoint(folder, progress)
    return folder


def bundled_questions() -> list[dict]:
    return [dict(q, image=str(DEMO_QUESTIONS.parent / q["image"])) for q in json.loads(DEMO_QUESTIONS.read_text())]
