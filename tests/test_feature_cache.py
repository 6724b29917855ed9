"""The frozen-expert feature cache: same outputs as the plain path, keyed by image and expert, safe to damage."""

import ast
import re

import pytest
import torch

from helpers.tiny_models import random_pixels, tiny_model
from helpers.training_data import overfit_set
from leo_mini_hf import LeoMiniForConditionalGeneration
from leo_mini_hf.cli import main as cli
from leo_mini_hf.training.feature_cache import VisionFeatureCache, expert_fingerprint, image_key
from test_training import load, losses_of, train


def frozen_tiny_model(**overrides):
    model = tiny_model(**overrides)
    for param in model.model.vision_experts.parameters():
        param.requires_grad_(False)
    return model


def attached_cache(directory, num_images):
    """A frozen tiny model, its pixels, their plain image features, and a cache attached to the model."""
    model = frozen_tiny_model()
    pixels = random_pixels(model.config, num_images=num_images)
    plain = model.get_image_features(pixels)
    cache = VisionFeatureCache(directory)
    cache.attach(model)
    return model, pixels, plain, cache


def cache_files(directory):
    return sorted(directory.rglob("*.safetensors"))


def test_cached_features_equal_the_plain_path_and_are_reused(tmp_path):
    model, pixels, plain, cache = attached_cache(tmp_path, num_images=3)
    first = model.get_image_features(pixels)
    assert cache.stats() == {"hits": 0, "misses": 3 * len(model.model.vision_experts)}
    second = model.get_image_features(pixels)
    assert cache.stats()["hits"] == 3 * len(model.model.vision_experts)
    assert torch.equal(first, plain) and torch.equal(second, plain)
    assert len(cache_files(tmp_path)) == 3 * len(model.model.vision_experts)
    cache.detach(model)
    assert "forward" not in model.model.vision_experts[0].__dict__
    assert torch.equal(model.get_image_features(pixels), plain)


def test_a_changed_image_or_expert_misses_the_cache(tmp_path):
    model, pixels, _, cache = attached_cache(tmp_path, num_images=2)
    model.get_image_features(pixels)
    changed = pixels.clone()
    changed[1, 0, 0, 0] += 1e-3
    assert image_key(changed[1]) != image_key(pixels[1]) and image_key(changed[0]) == image_key(pixels[0])
    misses = cache.misses
    model.get_image_features(changed)
    assert cache.misses - misses == len(model.model.vision_experts)  # only the changed image

    expert = model.model.vision_experts[0]
    before = expert_fingerprint(expert)
    with torch.no_grad():
        next(expert.model.parameters()).add_(0.01)  # new weights: old entries must not be served
    assert expert_fingerprint(expert) != before
    cache.detach(model)
    plain = model.get_image_features(pixels)
    cache.attach(model)
    torch.testing.assert_close(model.get_image_features(pixels), plain, rtol=0, atol=0)

    same, other_layer = frozen_tiny_model().model.vision_experts[0], frozen_tiny_model().model.vision_experts[0]
    assert expert_fingerprint(other_layer) == expert_fingerprint(same)
    other_layer.feature_layer = (same.feature_layer or 0) - 1
    assert expert_fingerprint(other_layer) != expert_fingerprint(same)


def test_a_damaged_entry_is_recomputed(tmp_path):
    model, pixels, plain, cache = attached_cache(tmp_path, num_images=1)
    model.get_image_features(pixels)
    for path in cache_files(tmp_path):
        path.write_bytes(b"not a safetensors file")
    assert torch.equal(model.get_image_features(pixels), plain)
    assert cache.hits == 0
    assert torch.equal(model.get_image_features(pixels), plain) and cache.hits > 0  # rewritten


@pytest.mark.parametrize("damage", ["flipped data bytes", "non-finite values with a matching digest"])
def test_an_entry_whose_data_is_damaged_is_a_miss(tmp_path, damage):
    """A well-formed file whose tensor data changed (a flipped byte, or NaN written by a broken run) is not served."""
    from safetensors.torch import load_file, save_file

    from leo_mini_hf.training.feature_cache import data_digest

    model, pixels, plain, cache = attached_cache(tmp_path, num_images=1)
    model.get_image_features(pixels)
    for path in cache_files(tmp_path):
        if damage == "flipped data bytes":
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x40  # inside the tensor data, not the header
            path.write_bytes(bytes(data))
        else:
            features = torch.full_like(load_file(str(path))["features"], float("nan"))
            save_file({"features": features}, str(path), metadata={"digest": data_digest(features)})
    hits = cache.hits
    assert torch.equal(model.get_image_features(pixels), plain)
    assert cache.hits == hits


def test_a_trainable_expert_cannot_be_cached(tmp_path):
    model = tiny_model()  # experts trainable
    with pytest.raises(ValueError, match="trainable parameters"):
        VisionFeatureCache(tmp_path).attach(model)


def test_training_with_the_cache_gives_the_same_loss_curve(tiny_checkpoint, tiny_processor, tmp_path):
    curves = []
    for use_cache in (False, True, True):  # plain; cache filled; cache read
        model = load(tiny_checkpoint, "finetune")
        cache = VisionFeatureCache(tmp_path / "cache")
        if use_cache:
            cache.attach(model)
        trainer = train(tiny_checkpoint, tiny_processor, tmp_path / "run", overfit_set(2), model=model, max_steps=4)
        trainer.train()
        curves.append(losses_of(trainer))
        if use_cache:  # the second cached run computes nothing
            assert (cache.misses == 0) == (len(curves) == 3) and cache.hits > 0
    assert curves[0] == curves[1] == curves[2]


def test_train_command_feature_cache_option(tiny_checkpoint, tmp_path, capsys):
    arguments = ["train", "--model", str(tiny_checkpoint), "--data", "easy-vqa", "--limit", "8", "--output_dir",
                 str(tmp_path / "run"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu",
                 "--report_to", "none", "--feature_cache_dir", str(tmp_path / "cache")]
    experts = len(LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).model.vision_experts)
    cli(arguments)
    first = stats_printed(capsys.readouterr().out)
    assert first["misses"] > 0 and first["hits"] + first["misses"] == 2 * 4 * experts
    arguments[arguments.index(str(tmp_path / "run"))] = str(tmp_path / "second-run")  # a new run, the same cache
    cli(arguments)
    assert stats_printed(capsys.readouterr().out) == {"hits": 2 * 4 * experts, "misses": 0}


def stats_printed(output: str) -> dict:
    return ast.literal_eval(re.search(r"feature cache .*: (\{.*\})", output).group(1))
