"""Checkpoints written before the #19 redesign (commit 5e18bdd) load into today's classes and compute the same logits."""

import json
from pathlib import Path

import pytest
import torch

from leo_mini_hf import LeoMiniForConditionalGeneration

DATA = Path(__file__).parent / "data"
OLD_CHECKPOINTS = sorted(DATA.glob("checkpoint-5e18bdd-*"))


def test_old_checkpoints_are_present():
    assert [folder.name for folder in OLD_CHECKPOINTS] == [
        "checkpoint-5e18bdd-avg-pool", "checkpoint-5e18bdd-default", "checkpoint-5e18bdd-options"]


@pytest.mark.parametrize("folder", OLD_CHECKPOINTS, ids=lambda folder: folder.name)
def test_old_checkpoint_loads_every_tensor_and_gives_its_logits(folder):
    model, loading = LeoMiniForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["mismatched_keys"], loading
    assert not loading["unexpected_keys"], loading
    expected = json.loads((folder / "expected_logits.json").read_text())
    config = model.config
    pixels = torch.linspace(-1, 1, 3 * config.image_size**2).reshape(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(expected["input_ids"]), pixel_values=pixels).logits[0, -1]
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-5)
