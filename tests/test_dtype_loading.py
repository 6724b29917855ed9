"""A dtype asked of `from_pretrained` reaches every sub-model, also for checkpoints whose LLM config carries its own
dtype (as every checkpoint built from pretrained parts does): the LLM is a sub-config, as in transformers' VLMs."""

import json
import re

import pytest
import torch

from helpers.tiny_models import image_prompt, random_pixels, tiny_model
from leo_mini_hf import LeoMiniForConditionalGeneration
from leo_mini_hf.modeling.modeling_leo_mini import trained_module_patterns


@pytest.fixture(scope="module")
def parts_style_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose text_config says `"dtype": "float32"`, as a pretrained LLM's config does."""
    folder = tmp_path_factory.mktemp("parts-style")
    model = tiny_model()
    model.config.text_config.dtype = torch.float32
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["text_config"]["dtype"] == "float32"
    return folder


def kept_in_float32(name: str, config) -> bool:
    return any(re.match(pattern, name) for pattern in trained_module_patterns(config))


@pytest.mark.parametrize("requested, expected", [
    (torch.bfloat16, torch.bfloat16), ("bfloat16", torch.bfloat16), ({"": torch.bfloat16}, torch.bfloat16),
    (torch.float16, torch.float16), ("auto", torch.float32),
])
def test_every_part_takes_the_requested_dtype(parts_style_checkpoint, requested, expected):
    model = LeoMiniForConditionalGeneration.from_pretrained(parts_style_checkpoint, dtype=requested)
    wrong = {}
    for name, param in model.named_parameters():
        # documented: a float16 load keeps CoTR, the projector and the MMoE adapters and routers in float32
        want = torch.float32 if expected == torch.float16 and kept_in_float32(name, model.config) else expected
        if param.dtype != want:
            wrong[name] = param.dtype
    assert not wrong, f"{len(wrong)} parameters not in the requested dtype, e.g. {list(wrong.items())[:3]}"
    assert model.config.text_config.dtype == expected
    prompt = torch.tensor([image_prompt(model.config)])
    assert torch.isfinite(model(input_ids=prompt, pixel_values=random_pixels(model.config)).logits).all()
