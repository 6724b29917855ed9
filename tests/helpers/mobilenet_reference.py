"""A pure-torch MobileNetV2 forward over the torchvision layout, and the inverse key mapping: what proves that
`leo_mini_hf.conversion.mobilenet_v2` converts torchvision weights exactly."""

import torch
import torch.nn.functional as F
from transformers import MobileNetV2ForImageClassification

from leo_mini_hf.conversion.mobilenet_v2 import torchvision_to_transformers_key

# (expansion t, output channels c, repeats n, first stride s) per stage, as in the MobileNetV2 paper / torchvision
INVERTED_RESIDUAL_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                             (6, 160, 3, 2), (6, 320, 1, 1)]


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
