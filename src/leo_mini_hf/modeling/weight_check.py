"""Refuse a checkpoint whose weights do not fit the model its config builds: LEO-MINI's `from_pretrained` check."""

import json
import os
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from safetensors import safe_open

# Inside a model folder while a save writes into it in place (`leo-mini train`'s final save); a folder that still
# holds it was cut short. (Folders written whole are staged elsewhere and moved into place: `folders.py`.)
INCOMPLETE_MARKER = ".leo-mini-incomplete"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def check_folder_complete(pretrained_model_name_or_path, subfolder: str = "") -> None:
    """A clear error for a local folder whose writing was interrupted (it still holds `INCOMPLETE_MARKER`)."""
    folder = Path(os.fspath(pretrained_model_name_or_path)) / subfolder
    if (folder / INCOMPLETE_MARKER).is_file():
        raise ValueError(f"{folder} was not completely written (a save was interrupted: it still holds "
                         f"{INCOMPLETE_MARKER}); save or train it again, or resume from its last complete checkpoint")


def checkpoint_weight_files(pretrained_model_name_or_path, subfolder: str = "", cache_dir=None,
                            revision=None) -> list[Path]:
    """The safetensors files of a local folder, or of a Hub checkpoint already in the local cache ([] if none)."""
    folder = Path(os.fspath(pretrained_model_name_or_path)) / subfolder
    if folder.is_dir():
        def find(name):
            return folder / name if (folder / name).is_file() else None
    else:
        def find(name):
            filename = f"{subfolder}/{name}" if subfolder else name
            found = try_to_load_from_cache(str(pretrained_model_name_or_path), filename, cache_dir=cache_dir,
                                           revision=revision)
            return Path(found) if isinstance(found, str) else None
    index = find(SAFETENSORS_INDEX)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path for path in map(find, shards) if path is not None]
    single = find("model.safetensors")
    return [single] if single is not None else []


def checkpoint_keys(files: list[Path]) -> set[str]:
    """The tensor names the safetensors files hold (headers only)."""
    keys = set()
    for path in files:
        with safe_open(path, framework="pt") as weights:
            keys.update(weights.keys())
    return keys


def non_float_weights(files: list[Path]) -> dict[str, str]:
    """Tensor name → safetensors dtype ("I64", "BOOL", …) of every tensor that is not floating point (headers only)."""
    found = {}
    for path in files:
        with safe_open(path, framework="pt") as weights:
            for name in weights.keys():
                dtype = weights.get_slice(name).get_dtype()
                if not dtype.startswith(("F", "BF")):
                    found[name] = dtype
    return found


def check_loaded_weights(parts: dict[str, str], loading_info: dict, fresh_parts, non_float: dict[str, str]) -> None:
    """Raise a ValueError when the loaded weights do not fit: a missing weight of a part not named in `fresh_parts`
    (parts as `parameter_parts()` gives them), a checkpoint weight the model has no place for, or a weight stored as
    integers. `loading_info` is what `from_pretrained(output_loading_info=True)` returns. (Weights of another shape
    already stop transformers, unless `ignore_mismatched_sizes=True` asks for fresh ones.)"""
    missing = sorted(key for key in loading_info["missing_keys"] if parts.get(key, "llm") not in set(fresh_parts))
    unexpected = sorted(loading_info["unexpected_keys"])
    problems = []
    if missing:
        missing_parts = sorted({parts.get(key, "llm") for key in missing})
        problems.append(f"{len(missing)} weight(s) of {missing_parts} are missing (e.g. {missing[:3]}) and would be "
                        f"random; to start these parts fresh on purpose, pass fresh_parts={missing_parts}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint weight(s) have no place in the model (e.g. {unexpected[:3]}): "
                        "was the config changed after the weights were saved (fewer layers or experts, another "
                        "token_reduction)? Restore the config the weights were trained with")
    if non_float:
        names = sorted(non_float)
        problems.append(f"{len(names)} weight(s) are stored as integers, not floating point (e.g. "
                        f"{[(name, non_float[name]) for name in names[:3]]}): the checkpoint is damaged")
    if problems:
        raise ValueError("The checkpoint does not fit its config: " + "; ".join(problems))
