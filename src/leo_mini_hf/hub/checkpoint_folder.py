"""Write a checkpoint folder that loads anywhere with transformers alone (Hub remote code)."""

import json
import shutil
from pathlib import Path

from .model_card import write_model_card

REMOTE_CODE_PACKAGES = ("modeling", "processor")
AUTO_MAP = {
    "AutoConfig": "configuration_leo_mini.LeoMiniConfig",
    "AutoModel": "modeling_leo_mini.LeoMiniModel",
    "AutoModelForImageTextToText": "modeling_leo_mini.LeoMiniForConditionalGeneration",
    "AutoProcessor": "processing_leo_mini.LeoMiniProcessor",
    "AutoImageProcessor": "image_processing_leo_mini.LeoMiniImageProcessor",
}
PROCESSOR_AUTO_MAP = {key: AUTO_MAP[key] for key in ("AutoProcessor", "AutoImageProcessor")}


def remote_code_files() -> list[Path]:
    """The files copied flat into every checkpoint: modeling/*.py and processor/*.py, without __init__."""
    package_root = Path(__file__).resolve().parent.parent
    files = []
    for package in REMOTE_CODE_PACKAGES:
        files += sorted(p for p in (package_root / package).glob("*.py") if p.name != "__init__.py")
    return files


def _update_json(path: Path, update) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    update(data)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_remote_code(folder) -> Path:
    """Copy the remote-code files into a saved model folder and point its `auto_map`s at them."""
    folder = Path(folder)
    for source in remote_code_files():
        shutil.copyfile(source, folder / source.name)
    _update_json(folder / "config.json", lambda config: config.update(auto_map=dict(AUTO_MAP)))

    def add_processor_auto_map(config):
        config["auto_map"] = dict(PROCESSOR_AUTO_MAP)
        if isinstance(config.get("image_processor"), dict):
            config["image_processor"]["auto_map"] = dict(PROCESSOR_AUTO_MAP)

    if (folder / "processor_config.json").is_file():
        _update_json(folder / "processor_config.json", add_processor_auto_map)
    return folder


def save_for_hub(model, processor, folder, max_shard_size: str = "5GB", card: dict | None = None) -> Path:
    """Save model + processor into `folder` with `auto_map`, the remote-code files and a model card (README.md;
    `card`: what the builder knows, as `write_model_card` takes it: base_models, datasets, ...), ready for the Hub."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    processor.save_pretrained(folder)
    write_model_card(model, folder, **(card or {}))
    return add_remote_code(folder)
