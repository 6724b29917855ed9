"""The trained parts of a model (CoTR, projector, MMoE) on their own: a few MB of safetensors with a checksum.

The shipped demo weights are such a file; the benchmarks save and load their trained rows with it.
"""

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .stages import TRAINED_PARTS


def trained_parameter_names(model) -> set[str]:
    """Names of the parameters stage-3 training changes (not the pretrained LLM and vision experts)."""
    return {name for name, part in model.parameter_parts().items() if part in TRAINED_PARTS}


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_adapter_weights(model, path, metadata: dict[str, str]) -> str:
    """Write the trained parts as float16 safetensors (+ a .sha256 file); returns the checksum."""
    path = Path(path)
    names = trained_parameter_names(model)
    state = {name: tensor.detach().to(torch.float16).contiguous()
             for name, tensor in model.state_dict().items() if name in names}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    checksum = sha256_of(path)
    path.with_suffix(".sha256").write_text(f"{checksum}  {path.name}\n")
    return checksum


def load_adapter_weights(model, path) -> None:
    """Load trained parts into an assembled model, after checking the checksum and that every trained parameter of
    the model is covered."""
    path = Path(path)
    expected = path.with_suffix(".sha256").read_text().split()[0]
    if sha256_of(path) != expected:
        raise ValueError(f"{path} does not match its checksum; the file is corrupt or was changed")
    state = load_file(str(path))
    model_state = model.state_dict()
    missing = sorted(trained_parameter_names(model) - set(state))
    unexpected = sorted(name for name in state if name not in model_state)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.load_state_dict({name: tensor.to(model_state[name].dtype) for name, tensor in state.items()}, strict=False)


def adapter_metadata(path) -> dict[str, str]:
    """The metadata saved with the weights (training settings, the config overrides they need)."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())
