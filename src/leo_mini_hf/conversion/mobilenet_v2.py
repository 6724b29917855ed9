"""torchvision MobileNetV2 state dict → transformers `MobileNetV2ForImageClassification`, with a pure-torch
reference forward over the torchvision layout to prove the conversion."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# (expansion t, output channels c, repeats n, first stride s) per stage, as in the MobileNetV2 paper / torchvision
INVERTED_RESIDUAL_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)]
_NORM = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}


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
    state_dict = torch.load(torchvision_weights, map_location="cpu", weights_only=True)
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


def reference_forward(state_dict: dict, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure-torch MobileNetV2 over the torchvision layout: (features (B, 1280, h, w), logits or None)."""

    def conv_bn(x, conv_key, bn_key, stride=1, groups=1, relu6=True):
        weight = state_dict[f"{conv_key}.weight"]
        x = F.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2, groups=groups)
        x = F.batch_norm(x, state_dict[f"{bn_key}.running_mean"], state_dict[f"{bn_key}.running_var"],
                         state_dict[f"{bn_key}.weight"], state_dict[f"{bn_key}.bias"], False, 0.0, 1e-5)
        return F.relu6(x) if relu6 else x

    x = conv_bn(pixel_values, "features.0.0", "features.0.1", stride=2)
    block = 1
    for expansion, _, repeats, first_stride in INVERTED_RESIDUAL_SETTING:
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            prefix = f"features.{block}.conv"
            inputs = x
            if expansion == 1:
                x = conv_bn(x, f"{prefix}.0.0", f"{prefix}.0.1", stride, groups=x.shape[1])
                x = conv_bn(x, f"{prefix}.1", f"{prefix}.2", relu6=False)
            else:
                x = conv_bn(x, f"{prefix}.0.0", f"{prefix}.0.1")
                x = conv_bn(x, f"{prefix}.1.0", f"{prefix}.1.1", stride, groups=x.shape[1])
                x = conv_bn(x, f"{prefix}.2", f"{prefix}.3", relu6=False)
            if stride == 1 and inputs.shape[1] == x.shape[1]:
                x = x + inputs
            block += 1
    features = conv_bn(x, "features.18.0", "features.18.1")
    logits = None
    if "classifier.1.weight" in state_dict:
        logits = F.linear(features.mean(dim=(2, 3)), state_dict["classifier.1.weight"], state_dict["classifier.1.bias"])
    return features, logits


def to_torchvision_state_dict(model: MobileNetV2ForImageClassification) -> dict:
    """Inverse mapping, for tests: a transformers MobileNetV2 → the torchvision layout."""
    inverse = {}
    transformers_state = model.state_dict()
    for block_key in _torchvision_keys(model.config):
        inverse[block_key] = transformers_state[torchvision_to_transformers_key(block_key)].clone()
    return inverse


def _torchvision_keys(config) -> list[str]:
    def conv(prefix):
        return [f"{prefix}.weight"]

    def norm(prefix):
        return [f"{prefix}.{leaf}" for leaf in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]

    keys = conv("features.0.0") + norm("features.0.1") + conv("features.1.conv.0.0") + norm("features.1.conv.0.1")
    keys += conv("features.1.conv.1") + norm("features.1.conv.2")
    for block in range(2, 18):
        p = f"features.{block}.conv"
        keys += conv(f"{p}.0.0") + norm(f"{p}.0.1") + conv(f"{p}.1.0") + norm(f"{p}.1.1") + conv(f"{p}.2") + norm(f"{p}.3")
    keys += conv("features.18.0") + norm("features.18.1") + ["classifier.1.weight", "classifier.1.bias"]
    return keys
