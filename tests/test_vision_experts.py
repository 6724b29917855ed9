"""Vision experts of several families: output tokens, input resizing and re-normalisation, layer selection."""

import pytest
import torch

from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from leo_mini_hf.modeling.vision_experts import VisionExpert

VIT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
FAMILIES = {
    "clip_vision_model": ({**VIT, "image_size": 32, "patch_size": 8}, 1, 16, 32),
    "siglip_vision_model": ({**VIT, "image_size": 32, "patch_size": 8}, 0, 16, 32),
    "dinov2": ({**VIT, "image_size": 28, "patch_size": 7}, 1, 16, 32),
    "convnext": ({"hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1], "image_size": 64}, 0, 4, 32),
    "mobilenet_v2": ({"depth_multiplier": 0.35, "image_size": 64, "tf_padding": False}, 0, 4, 1280),
}


def make_expert(model_type, canonical_mean=CLIP_MEAN, canonical_std=CLIP_STD, **spec):
    config, prefix, _, _ = FAMILIES[model_type]
    expert = {"config": {"model_type": model_type, **config}, "image_size": config["image_size"],
              "feature_layer": None, "num_prefix_tokens": prefix, "image_mean": IMAGENET_MEAN,
              "image_std": IMAGENET_STD, **spec}
    torch.manual_seed(0)
    return VisionExpert(expert, canonical_mean, canonical_std).eval()


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_each_family_yields_tokens(model_type):
    _, _, num_tokens, hidden_size = FAMILIES[model_type]
    expert = make_expert(model_type)
    assert (expert.num_tokens, expert.hidden_size) == (num_tokens, hidden_size)
    features = expert(torch.randn(3, 3, 48, 48))  # canonical size differs from the expert's: resized inside
    assert features.shape == (3, num_tokens, hidden_size)


def test_renormalisation_maps_canonical_to_expert_statistics():
    expert = make_expert("convnext")
    raw = torch.rand(2, 3, 64, 64)  # pixels in [0, 1]
    canonical = (raw - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(expert._prepare_pixels(canonical), expected)


def test_same_statistics_and_size_leave_pixels_unchanged():
    expert = make_expert("convnext", canonical_mean=IMAGENET_MEAN, canonical_std=IMAGENET_STD)
    pixels = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(expert._prepare_pixels(pixels), pixels)
    torch.testing.assert_close(expert(pixels), expert.model(pixels).last_hidden_state.flatten(2).transpose(1, 2))


def test_feature_layer_and_prefix_tokens_select_the_right_features():
    expert = make_expert("clip_vision_model", feature_layer=-2)
    pixels = torch.randn(2, 3, 32, 32)
    hidden_states = expert.model(expert._prepare_pixels(pixels), output_hidden_states=True).hidden_states
    torch.testing.assert_close(expert(pixels), hidden_states[-2][:, 1:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_experts_resize(dtype):
    expert = make_expert("convnext").to(dtype)
    features = expert(torch.randn(1, 3, 96, 96, dtype=dtype))  # downsampling: antialiased
    assert features.dtype == dtype and features.shape == (1, 4, 32)
