"""A checkpoint whose weights do not fit its config is refused on load, with an error naming what does not fit;
parts the user names in `fresh_parts` may start fresh."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.tiny_models import image_prompt, random_pixels, tiny_model
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniModel
from leo_mini_hf.modeling.weight_check import INCOMPLETE_MARKER


@pytest.fixture
def saved(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def edit_weights(folder, edit):
    weights = load_file(folder / "model.safetensors")
    edit(weights)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_fitting_checkpoint_loads_as_saved(saved):
    model, folder = saved
    loaded = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    inputs = {"input_ids": torch.tensor([image_prompt(model.config)]), "pixel_values": random_pixels(model.config)}
    torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits)
    LeoMiniModel.from_pretrained(folder)  # the backbone alone: the head's weight is not "unexpected"


@pytest.mark.parametrize("prefix, part", [("model.token_reducer.", "token_reducer"), ("lm_head.", "llm"),
                                          ("model.multi_modal_projector.", "projector")])
def test_missing_weights_are_refused_unless_asked_fresh(saved, prefix, part):
    _, folder = saved
    edit_weights(folder, lambda weights: [weights.pop(key) for key in list(weights) if key.startswith(prefix)])
    with pytest.raises(ValueError, match=rf"does not fit its config: \d+ weight\(s\) of \['{part}'\] are missing "
                                         rf"\(e.g. \['{prefix}.*fresh_parts=\['{part}'\]"):
        LeoMiniForConditionalGeneration.from_pretrained(folder)
    LeoMiniForConditionalGeneration.from_pretrained(folder, fresh_parts=[part])


def test_fresh_parts_must_be_parts(saved):
    with pytest.raises(ValueError, match="fresh_parts must name parts of"):
        LeoMiniForConditionalGeneration.from_pretrained(saved[1], fresh_parts=["cotr"])


def test_integer_weights_are_refused(saved):
    _, folder = saved
    edit_weights(folder, lambda weights: weights.update({"lm_head.weight": weights["lm_head.weight"].long()}))
    with pytest.raises(ValueError, match=r"1 weight\(s\) are stored as integers.*lm_head.weight', 'I64'"):
        LeoMiniForConditionalGeneration.from_pretrained(folder)


@pytest.mark.parametrize("change", [
    lambda config: config.update(mmoe_num_experts=0),
    lambda config: config.update(token_reduction="avg_pool"),
    lambda config: config["text_config"].update(num_hidden_layers=1),
], ids=["no routed experts", "another token_reduction", "fewer layers"])
def test_a_config_changed_after_training_is_refused(saved, change):
    _, folder = saved
    edit_config(folder, change)
    with pytest.raises(ValueError, match=r"checkpoint weight\(s\) have no place in the model.*config changed after"):
        LeoMiniForConditionalGeneration.from_pretrained(folder)


def test_a_folder_whose_save_was_cut_short_is_refused(saved):
    _, folder = saved
    (folder / INCOMPLETE_MARKER).write_text("{}")
    with pytest.raises(ValueError, match="was not completely written"):
        LeoMiniForConditionalGeneration.from_pretrained(folder)


def as_saved_before_base_linear(folder):
    """Rewrite a checkpoint in the layout from before MMoE layers wrapped their base linear (`...down_proj.weight`
    beside `...down_proj.general_lora_A`)."""
    edit_weights(folder, lambda weights: weights.update(
        {key.replace(".base_linear.", "."): weights.pop(key) for key in [k for k in weights if ".base_linear." in k]}))


def assert_same_model(loaded, expected_state, inputs, expected_logits):
    """Every tensor bit-identical; the logits equal to float32 rounding (the loaded tensors sit in the safetensors
    file's memory map, whose offsets move with the key names, and CPU matmuls may round the last bit differently at
    another alignment)."""
    state = loaded.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[name], tensor) for name, tensor in expected_state.items())
    torch.testing.assert_close(loaded(**inputs).logits, expected_logits, rtol=0, atol=1e-6)


def test_a_checkpoint_from_before_base_linear_loads_bit_identically(saved, tmp_path):
    model, folder = saved
    inputs = {"input_ids": torch.tensor([image_prompt(model.config)]), "pixel_values": random_pixels(model.config)}
    expected = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    expected_state, expected_logits = expected.state_dict(), expected(**inputs).logits
    as_saved_before_base_linear(folder)
    assert any(key.endswith("mlp.down_proj.weight") for key in load_file(folder / "model.safetensors"))
    old = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    assert_same_model(old, expected_state, inputs, expected_logits)
    old.save_pretrained(tmp_path / "again")  # and saves what loads again
    assert_same_model(LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "again").eval(), expected_state,
                      inputs, expected_logits)


def test_a_hub_checkpoint_from_before_base_linear_loads_on_its_first_download(saved, monkeypatch):
    """On a checkpoint's first download its keys cannot be read before transformers fetches it: the load repeats."""
    from leo_mini_hf.modeling import modeling_leo_mini

    model, folder = saved
    as_saved_before_base_linear(folder)
    real = modeling_leo_mini.checkpoint_weight_files
    calls = []

    def not_downloaded_yet(*args):
        calls.append(args)
        return [] if len(calls) == 1 else real(*args)

    monkeypatch.setattr(modeling_leo_mini, "checkpoint_weight_files", not_downloaded_yet)
    loaded = LeoMiniForConditionalGeneration.from_pretrained(folder)
    assert len(calls) == 3  # before, after the first load, and before the second
    layer = loaded.model.language_model.layers[0].mlp.down_proj
    assert torch.equal(layer.base_linear.weight, model.model.language_model.layers[0].mlp.down_proj.base_linear.weight)
