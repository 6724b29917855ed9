"""Evaluation helpers: the swapped-image (question-only) control."""

import pytest

from leo_mini_hf.easyvqa.evaluation import with_images_swapped
from leo_mini_hf.easyvqa.mosaic import EasyVQAMosaicDataset


def image_of(sample):
    return sample["messages"][0]["content"][0]["image"]


def test_every_question_gets_another_samples_image_exactly_once():
    samples = [EasyVQAMosaicDataset("test", 2, size=12)[i] for i in range(12)]
    swapped = with_images_swapped(samples, seed=0)
    assert [s["messages"][0]["content"][1] for s in swapped] == [s["messages"][0]["content"][1] for s in samples]
    assert [s["answer"] for s in swapped] == [s["answer"] for s in samples]
    original = [id(image_of(s)) for s in samples]
    shown = [id(image_of(s)) for s in swapped]
    assert sorted(shown) == sorted(original)  # a permutation of the images
    assert all(a != b for a, b in zip(shown, original))  # nobody keeps its own
    assert [id(image_of(s)) for s in samples] == original  # the input samples are not modified
    assert shown == [id(image_of(s)) for s in with_images_swapped(samples, seed=0)]
    assert shown != [id(image_of(s)) for s in with_images_swapped(samples, seed=1)]


def test_swapping_needs_two_samples():
    with pytest.raises(ValueError, match="at least 2"):
        with_images_swapped([EasyVQAMosaicDataset("test", 2, size=1)[0]])
