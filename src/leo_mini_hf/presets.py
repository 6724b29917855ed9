"""Named LEO-MINI configurations: `preset_config("tiny")`, `preset_config("leo-mini-smol")`,
`preset_config("leo-mini-llama3-8b")`.

Every sub-config here is complete: in transformers 5.x a partial sub-config dict silently becomes a full-size
default model. `tiny` is the one place the test suite and the `tiny` preset take their sizes from. Presets are the
package's, not a checkpoint's: a saved config holds every value, so remote code never needs them.
"""

import difflib

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .modeling import LeoMiniConfig

# Special tokens of the tiny tokenizer; the tiny text config's vocabulary is sized to hold them.
TINY_IMAGE_TOKEN_ID = 4
TINY_VOCAB_SIZE = 384


def _llama_text_config(
    vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, num_key_value_heads, **extra
):
    return {
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        **extra,
    }


def _vit_like_expert(model_type, hidden_size, intermediate_size, layers, heads, image_size, patch_size, **spec):
    config = {
        "model_type": model_type,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "image_size": image_size,
        "patch_size": patch_size,
    }
    return {"config": config, "image_size": image_size, **spec}


def _convnext_expert(hidden_sizes, depths, image_size, image_mean, image_std):
    config = {"model_type": "convnext", "hidden_sizes": hidden_sizes, "depths": depths, "image_size": image_size}
    return {"config": config, "image_size": image_size, "feature_layer": None, "num_prefix_tokens": 0,
            "image_mean": list(image_mean), "image_std": list(image_std)}


def tiny():
    """Random, tiny: two experts of different kinds (ViT-style CLIP, CNN-style ConvNeXt); seconds on CPU."""
    return {
        "text_config": _llama_text_config(
            TINY_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "vision_experts": [
            _vit_like_expert(
                "clip_vision_model", 32, 64, layers=2, heads=2, image_size=32, patch_size=8,
                feature_layer=-2, num_prefix_tokens=1, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
            ),
            _convnext_expert([8, 16, 24, 40], [1, 1, 1, 1], 64, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
        ],
        "image_size": 64,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "image_token_id": TINY_IMAGE_TOKEN_ID,
        "num_visual_tokens": 4,
        "cotr_projection_dim": 16,
        "mmoe_rank": 4,
        "mmoe_alpha": 8,
        "mmoe_router_hidden_size": 16,
    }


def leo_mini_llama3_8b():
    """The paper's LEO-Mini-Llama3-8B shape: Llama-3-8B + four EAGLE-X4 experts at 1024 px, N_V = 64.

    CLIP ViT-L/14-336 and a CLIP-ConvNeXt-XXL-shaped ConvNeXt have transformers classes. EVA-02-L and the
    Pix2Struct-large encoder have none that takes `pixel_values`, so they are ViT models of the same width,
    depth and patch size (stand-ins for cost and shape, not for weights).
    """
    return {
        "text_config": _llama_text_config(
            128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
            eos_token_id=128009,
        ),
        "vision_experts": [
            _vit_like_expert(
                "clip_vision_model", 1024, 4096, layers=24, heads=16, image_size=336, patch_size=14,
                feature_layer=-2, num_prefix_tokens=1, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
            ),
            _convnext_expert([384, 768, 1536, 3072], [3, 4, 30, 3], 1024, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
            _vit_like_expert(  # EVA-02-L stand-in
                "vit", 1024, 4096, layers=24, heads=16, image_size=1024, patch_size=16,
                feature_layer=None, num_prefix_tokens=1, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
            ),
            _vit_like_expert(  # Pix2Struct-large encoder stand-in
                "vit", 1536, 3968, layers=18, heads=24, image_size=1024, patch_size=16,
                feature_layer=None, num_prefix_tokens=1, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD,
            ),
        ],
        "image_size": 1024,
        "image_mean": OPENAI_CLIP_MEAN,
        "image_std": OPENAI_CLIP_STD,
        "image_token_id": 128002,  # <|reserved_special_token_0|>
        "num_visual_tokens": 64,
    }


# LEO-MINI-Smol's own options: 196 MobileNetV2 tokens reduced to 16; adapter sizes keep its trained weights a few MB;
# its routers in the layout its shipped demo weights were trained with (each projects the context and the hidden state)
SMOL_OPTIONS = {"num_visual_tokens": 16, "cotr_projection_dim": 128, "mmoe_rank": 4, "mmoe_alpha": 8,
                "mmoe_router_hidden_size": 16, "mmoe_router_token_input": "hidden_state",
                "mmoe_router_context": "per_layer"}
SMOL_IMAGE_SIZE = 448
SMOL_IMAGE_TOKEN_ID = 49152  # `<image>`, added after SmolLM2's 49152 tokens


def leo_mini_smol():
    """LEO-MINI-Smol's shape, the demo model: SmolLM2-135M-Instruct + ImageNet MobileNetV2 at 448 px (14 x 14 = 196
    tokens), N_V = 16. `leo-mini build --preset leo-mini-smol` assembles it with the pretrained weights installed
    offline (`conversion/smol.py`); a model built from this config alone has the shape, with random weights."""
    return {
        "text_config": _llama_text_config(
            SMOL_IMAGE_TOKEN_ID + 1, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, head_dim=64,
            rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, bos_token_id=1, eos_token_id=2,
            pad_token_id=2, tie_word_embeddings=True,
        ),
        "vision_experts": [{
            "config": {"model_type": "mobilenet_v2", "depth_multiplier": 1.0, "tf_padding": False,
                       "layer_norm_eps": 1e-5, "image_size": 224},
            "image_size": SMOL_IMAGE_SIZE, "feature_layer": None, "num_prefix_tokens": 0,
            "image_mean": list(IMAGENET_DEFAULT_MEAN), "image_std": list(IMAGENET_DEFAULT_STD),
        }],
        "image_size": SMOL_IMAGE_SIZE,
        "image_mean": IMAGENET_DEFAULT_MEAN,
        "image_std": IMAGENET_DEFAULT_STD,
        "image_token_id": SMOL_IMAGE_TOKEN_ID,
        "tie_word_embeddings": True,
        **SMOL_OPTIONS,
    }


LEO_MINI_PRESETS = {
    "tiny": tiny,
    "leo-mini-smol": leo_mini_smol,
    "leo-mini-llama3-8b": leo_mini_llama3_8b,
}


def check_option_names(options: dict) -> None:
    """Refuse names that are not `LeoMiniConfig` options (a typo would otherwise be stored and silently ignored)."""
    known = set(LeoMiniConfig.__annotations__)
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; options: {', '.join(sorted(known))}"
            raise ValueError(f"{name!r} is not a LeoMiniConfig option{hint}")


def preset_config(name: str, **overrides) -> LeoMiniConfig:
    """The named configuration (`tiny`, `leo-mini-smol`, `leo-mini-llama3-8b`), with top-level options overridden."""
    if name not in LEO_MINI_PRESETS:
        raise ValueError(f"Unknown preset {name!r}; available: {sorted(LEO_MINI_PRESETS)}")
    check_option_names(overrides)
    return LeoMiniConfig(**{**LEO_MINI_PRESETS[name](), **overrides})
