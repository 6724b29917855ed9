"""LeoMiniConfig: presets, options and their validation, serialisation."""

import json

import pytest
import torch

from helpers.tiny_models import tiny_config
from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration, preset_config


def test_tiny_preset_and_overrides():
    config = tiny_config(num_visual_tokens=8, cotr_shared_query=True)
    assert config.num_visual_tokens == 8 and config.cotr_shared_query
    assert config.text_config.model_type == "llama"
    assert len(config.vision_experts) == 2
    assert config.num_image_tokens == 8
    assert tiny_config(token_reduction="none").num_image_tokens == 16


def test_documented_defaults():
    config = LeoMiniConfig(**{k: v for k, v in preset_config("tiny").to_dict().items()
                              if k in ("text_config", "vision_experts", "image_token_id")})
    assert config.num_visual_tokens == 64
    assert config.cotr_projection_dim == 256
    assert config.cotr_score_scaling == "pooled_inverse_dim"
    assert config.cotr_shared_query is False
    assert config.mmoe_target_modules == ["down_proj"]
    assert (config.mmoe_num_experts, config.mmoe_top_k, config.mmoe_rank) == (3, 1, 16)
    assert config.mmoe_router_uses_hidden_state is True
    assert (config.mmoe_router_token_input, config.mmoe_router_context) == ("general_lora", "shared")
    assert config.mmoe_expert_weighting == "softmax"
    assert config.mmoe_balance_loss_coef == 0.05


def test_paper_preset_shapes_on_meta_device():
    config = preset_config("leo-mini-llama3-8b")
    assert config.text_config.hidden_size == 4096 and config.text_config.num_hidden_layers == 32
    with torch.device("meta"):
        model = LeoMiniForConditionalGeneration(config)
    experts = model.model.vision_experts
    assert [e.hidden_size for e in experts] == [1024, 3072, 1024, 1536]  # EAGLE-X4: 6656 channels
    assert [e.num_tokens for e in experts] == [576, 1024, 4096, 4096]
    assert model.model.multi_modal_projector.linear_1.in_features == 6656
    llm_params = sum(p.numel() for p in model.model.language_model.parameters() if p.requires_grad)
    assert 7.4e9 < llm_params + model.lm_head.weight.numel() < 8.2e9


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        preset_config("huge")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"token_reduction": "pool"}, "token_reduction"),
        ({"cotr_score_scaling": "none"}, "cotr_score_scaling"),
        ({"mmoe_expert_weighting": "max"}, "mmoe_expert_weighting"),
        ({"num_visual_tokens": 0}, "num_visual_tokens"),
        ({"mmoe_top_k": 4}, "mmoe_top_k"),
        ({"mmoe_num_experts": -1}, "mmoe_num_experts"),
        ({"image_token_id": -1}, "image_token_id"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"text_config": {"hidden_size": 64}}, "model_type"),
        ({"vision_experts": [{"config": {"model_type": "convnext"}, "image_size": 64, "layer": 1}]}, "unknown keys"),
        ({"vision_experts": [{"config": {}, "image_size": 64}]}, "model_type"),
        ({"vision_experts": [{"config": {"model_type": "convnext"}, "image_size": 0}]}, "image_size"),
    ],
)
def test_bad_options_raise(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_model_without_experts_raises():
    with pytest.raises(ValueError, match="at least one vision expert"):
        LeoMiniForConditionalGeneration(tiny_config(vision_experts=[]))


def test_json_round_trip(tmp_path):
    config = tiny_config(num_visual_tokens=8, mmoe_router_uses_hidden_state=False)
    config.save_pretrained(tmp_path)
    reloaded = LeoMiniConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.vision_experts == config.vision_experts
    assert reloaded.text_config.to_dict() == config.text_config.to_dict()


def test_options_with_fixed_choices_are_typed_and_checked_in_one_place():
    """Every `Literal[...]`-typed option is validated against its choices, so a new option needs no extra check."""
    import dataclasses
    from typing import Literal, get_args

    typed = {field.name: get_args(field.type) for field in dataclasses.fields(LeoMiniConfig)
             if getattr(field.type, "__origin__", None) is Literal}
    assert set(typed) == {"token_reduction", "cotr_pooling", "cotr_score_scaling", "cotr_text_source",
                          "mmoe_expert_weighting", "mmoe_router_token_input", "mmoe_router_context"}
    for name, choices in typed.items():
        assert getattr(tiny_config(), name) in choices
        with pytest.raises(ValueError, match=rf"`{name}` must be one of"):
            tiny_config(**{name: "no-such-choice"})


def test_a_saved_config_without_the_router_layout_options_loads_in_the_layout_it_was_trained_with(tmp_path):
    """Checkpoints saved before `mmoe_router_token_input` / `mmoe_router_context` existed were trained with routers
    that project the hidden state and the context themselves; a config built in code takes today's defaults."""
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["mmoe_router_token_input"], saved["mmoe_router_context"]) == ("general_lora", "shared")
    assert LeoMiniConfig.from_pretrained(tmp_path).mmoe_router_context == "shared"  # saved: kept as saved
    del saved["mmoe_router_token_input"], saved["mmoe_router_context"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = LeoMiniConfig.from_pretrained(tmp_path)
    assert (old.mmoe_router_token_input, old.mmoe_router_context) == ("hidden_state", "per_layer")
    assert LeoMiniConfig.from_pretrained(tmp_path, mmoe_router_context="shared").mmoe_router_context == "shared"
    assert tiny_config().mmoe_router_context == "shared"


def test_format_version_of_old_configs_is_dropped(tmp_path):
    config = tiny_config()
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "format_version" not in saved
    saved["format_version"] = 1  # what checkpoints before 0.2 wrote
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = LeoMiniConfig.from_pretrained(tmp_path)
    assert not hasattr(reloaded, "format_version") and reloaded.to_dict() == config.to_dict()


@pytest.mark.parametrize("overrides, error, match", [
    ({"mmoe_num_experts": "abc"}, TypeError, "`mmoe_num_experts` must be of type int, got str"),
    ({"mmoe_alpha": "abc"}, TypeError, "`mmoe_alpha` must be of type float, got str"),
    ({"text_config": 5}, TypeError, "`text_config` must be a dict or a PreTrainedConfig"),
    ({"mmoe_target_modules": "down_proj"}, TypeError, "`mmoe_target_modules` must be of type list"),
    ({"mmoe_target_modules": [1]}, TypeError, "list of module names"),
    ({"num_visual_tokens": True}, TypeError, "`num_visual_tokens` must be of type int, got bool"),
    ({"cotr_shared_query": "yes"}, TypeError, "`cotr_shared_query` must be of type bool"),
    ({"image_size": 0}, ValueError, "`image_size` must be positive"),
    ({"full_token_grid": 0}, ValueError, "`full_token_grid` must be positive"),
    ({"mmoe_alpha": -1.0}, ValueError, "`mmoe_alpha` must be positive"),
    ({"mmoe_dropout": 1.5}, ValueError, r"`mmoe_dropout` must be in \[0, 1\)"),
    ({"mmoe_balance_loss_coef": -0.1}, ValueError, "`mmoe_balance_loss_coef` must be >= 0"),
    ({"image_std": [0.5, 0.0, 0.5]}, ValueError, "`image_std` must be positive"),
])
def test_every_option_is_type_and_range_checked(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_int_for_float_and_tuples_for_lists_are_accepted():
    config = tiny_config(mmoe_alpha=8, image_mean=(0.5, 0.5, 0.5), mmoe_target_modules=("down_proj",))
    assert config.mmoe_alpha == 8 and config.image_mean == [0.5, 0.5, 0.5]
    assert config.mmoe_target_modules == ["down_proj"]


def test_unknown_option_names_are_refused_with_a_suggestion():
    with pytest.raises(ValueError, match="'num_visual_token' is not a LeoMiniConfig option; did you mean "
                                         "'num_visual_tokens'"):
        preset_config("tiny", num_visual_token=16)
