"""torchvision MobileNetV2 state dict → transformers `MobileNetV2ForImageClassification` (every key mapped by an
explicit rule; `tests/helpers/mobilenet_reference.py` proves it against a pure-torch forward)."""

import re
from pathlib import Path

import torch
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..folders import require_path


def torchvision_to_transformers_key(key: str) -> str:
    """One torchvision key → its `MobileNetV2ForImageClassification` key (explicit rules, not key order)."""
    if match := re.fullmatch(r"classifier\.1\.(weight|bias)", key):
        return f"classifier.{match[1]}"
    if match := re.fullmatch(r"features\.0\.([01])\.(\w+)", key):
        part = "convolution" if match[1] == "0" else "normalization"
        return f"mobilenet_v2.conv_stem.first_conv.{part}.{match[2]}"
    if match := re.fullmatch(r"features\.18\.([01])\.(\w+)", key):
        part = "convolution" if match[1] == "0" else "normalization"
        return f"mobilenet_v2.conv_1x1.{part}.{match[2]}"
    if match := re.fullmatch(r"features\.1\.conv\.(0\.0|0\.1|1|2)\.(\w+)", key):  # first block: no expansion
        target = {"0.0": "conv_3x3.convolution", "0.1": "conv_3x3.normalization",
                  "1": "reduce_1x1.convolution", "2": "reduce_1x1.normalization"}[match[1]]
        return f"mobilenet_v2.conv_stem.{target}.{match[2]}"
    if match := re.fullmatch(r"features\.(\d+)\.conv\.(0\.0|0\.1|1\.0|1\.1|2|3)\.(\w+)", key):
        block = int(match[1])
        if not 2 <= block <= 17:
            raise ValueError(f"Unexpected MobileNetV2 block in key {key!r}")
        target = {"0.0": "expand_1x1.convolution", "0.1": "expand_1x1.normalization",
                  "1.0": "conv_3x3.convolution", "1.1": "conv_3x3.normalization",
                  "2": "reduce_1x1.convolution", "3": "reduce_1x1.normalization"}[match[2]]
        return f"mobilenet_v2.layer.{block - 2}.{target}.{match[3]}"
    raise ValueError(f"Not a torchvision MobileNetV2 key: {key!r}")


WIDTH_MULTIPLIERS = (1.4, 1.3, 1.0, 0.75, 0.5, 0.35)


def convert_state_dict(state_dict: dict) -> tuple[MobileNetV2Config, dict]:
    """torchvision state dict → (config, transformers state dict). Every tensor is mapped by name; the width
    multiplier is the one whose transformers model has exactly these shapes."""
    num_labels = state_dict["classifier.1.weight"].shape[0] if "classifier.1.weight" in state_dict else 1000
    converted = {torchvision_to_transformers_key(key): tensor for key, tensor in state_dict.items()}
    for multiplier in WIDTH_MULTIPLIERS:
        config = MobileNetV2Config(depth_multiplier=multiplier, tf_padding=False, layer_norm_eps=1e-5,
                                   num_labels=num_labels, image_size=224)
        with torch.device("meta"):
            shapes = {key: tensor.shape for key, tensor in MobileNetV2ForImageClassification(config).state_dict().items()}
        if shapes.keys() == converted.keys() and all(shapes[k] == converted[k].shape for k in shapes):
            return config, converted
    raise ValueError(f"The state dict fits no MobileNetV2 of width multiplier {WIDTH_MULTIPLIERS}")


def convert_mobilenet_v2(torchvision_weights, out) -> Path:
    """Write a transformers MobileNetV2 folder (safetensors + config + preprocessor stats) from a `.pth` file."""
    path = require_path(torchvision_weights, "torchvision MobileNetV2 weights", kind="file")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load fails in many ways on a file that is not a checkpoint
        raise ValueError(f"{path} is not a PyTorch weights file: {type(error).__name__}: {error}") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} does not hold a state dict (names → tensors)")
    config, converted = convert_state_dict(state_dict)
    model = MobileNetV2ForImageClassification(config)
    expected = set(model.state_dict())
    if set(converted) != expected:
        raise ValueError(f"Converted keys do not match transformers' MobileNetV2: missing "
                         f"{sorted(expected - set(converted))[:5]}, unexpected {sorted(set(converted) - expected)[:5]}")
    model.load_state_dict(converted, strict=True)
    out = Path(out)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        '{"image_processor_type": "MobileNetV2ImageProcessor", "crop_size": {"height": 224, "width": 224}, '
        f'"image_mean": {IMAGENET_DEFAULT_MEAN}, "image_std": {IMAGENET_DEFAULT_STD}}}\n'
    )
    return out
