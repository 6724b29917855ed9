"""transformers `LlavaForConditionalGeneration` folder → LEO-MINI with one CLIP expert.

Carried over: the CLIP tower, LLaVA's projector, the LLM and LM head, the tokenizer and the image token id. With
`token_reduction="none"` the result computes LLaVA's logits; with CoTR it is the starting point for CoTR / MMoE
training (CoTR and MMoE fresh, LoRA B zero).
"""

import json
from pathlib import Path

import torch
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from ..folders import require_path
from ..hub.checkpoint_folder import save_for_hub
from ..hub.model_card import hub_model_id
from ..modeling import LeoMiniConfig, LeoMiniForConditionalGeneration
from ..presets import check_option_names
from ..processor import LeoMiniProcessor
from .pretrained_parts import copy_llm_weights_exactly, copy_weights_exactly, load_complete


def llava_to_leo_mini_config(llava_config, token_reduction: str = "none", **overrides) -> LeoMiniConfig:
    check_option_names(overrides)
    vision_config = llava_config.vision_config
    if not isinstance(llava_config.vision_feature_layer, int):
        raise ValueError("LLaVA models that concatenate several vision feature layers are not supported")
    if llava_config.vision_feature_select_strategy != "default":
        raise ValueError("Only LLaVA models with vision_feature_select_strategy='default' (CLS token dropped, a square "
                         f"token grid) convert; got {llava_config.vision_feature_select_strategy!r}")
    image_size = vision_config.image_size
    expert = {
        "config": vision_config.to_dict(),
        "image_size": image_size,
        "feature_layer": llava_config.vision_feature_layer,
        "num_prefix_tokens": 1,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    return LeoMiniConfig(
        text_config=llava_config.text_config.to_dict(),
        vision_experts=[expert],
        image_size=image_size,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        image_token_id=llava_config.image_token_id,
        token_reduction=token_reduction,
        full_token_grid=image_size // vision_config.patch_size,
        tie_word_embeddings=bool(getattr(llava_config, "tie_word_embeddings", False)),
        **overrides,
    )


def convert_llava_model(llava: LlavaForConditionalGeneration, token_reduction: str = "none",
                        **overrides) -> LeoMiniForConditionalGeneration:
    """In memory: the LLaVA weights copied exactly into a fresh LEO-MINI."""
    config = llava_to_leo_mini_config(llava.config, token_reduction, **overrides)
    model = LeoMiniForConditionalGeneration(config)
    copy_weights_exactly(model.vision_experts[0].model, llava.model.vision_tower.state_dict(), "CLIP tower")
    projector_state = dict(llava.model.multi_modal_projector.state_dict())
    for layer in ("linear_1", "linear_2"):  # LLaVA may have no projector bias; ours always has one: zero it
        weight = projector_state[f"{layer}.weight"]
        projector_state.setdefault(f"{layer}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    copy_weights_exactly(model.multi_modal_projector, projector_state, "projector")
    copy_llm_weights_exactly(model, llava.model.language_model.state_dict(), llava.lm_head.state_dict())
    model.generation_config = llava.generation_config
    return model


def check_is_llava(folder: Path) -> None:
    """A clear error for a folder that is not a transformers LLaVA checkpoint (its config.json says what it is)."""
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{folder} is not a transformers checkpoint folder (no readable config.json: {error})") \
            from None
    if model_type != "llava":
        raise ValueError(f"{folder} is not a LLaVA checkpoint: its config.json has model_type {model_type!r}, not "
                         "'llava' (convert llava takes a transformers LlavaForConditionalGeneration folder, e.g. "
                         "llava-hf/llava-1.5-7b-hf)")


def convert_llava(src, out, token_reduction: str = "none", **overrides) -> Path:
    """A LLaVA folder → a Hub-ready LEO-MINI folder (weights, processor with LLaVA's tokenizer, remote code)."""
    src = require_path(src, "The LLaVA model")
    check_is_llava(src)
    llava = load_complete(LlavaForConditionalGeneration, src, "The LLaVA model")
    model = convert_llava_model(llava, token_reduction, **overrides)
    try:
        tokenizer = AutoProcessor.from_pretrained(src).tokenizer
    except (OSError, ValueError, TypeError):
        tokenizer = AutoTokenizer.from_pretrained(src)
    image_token = tokenizer.convert_ids_to_tokens(model.config.image_token_id)
    tokenizer.padding_side = "left"  # generation pads on the left; saved with the tokenizer, as llava-hf's are
    tokenizer.init_kwargs["padding_side"] = "left"
    base_model = hub_model_id(src)
    return save_for_hub(model, LeoMiniProcessor.from_model_config(model.config, tokenizer, image_token), out,
                        card={"base_models": [base_model] if base_model else []})
