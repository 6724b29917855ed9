"""Object-named mosaics: each question names one tile by its content; answers right, balanced, not guessable from the
mosaic's attribute counts, and the named cell is the tile the answer comes from."""

import re
from collections import Counter
from pathlib import Path

import pytest

from leo_mini_hf.easyvqa.dataset import COLOURS, SHAPES
from leo_mini_hf.easyvqa.mosaic import BLANK_BACKGROUND, EasyVQAMosaicDataset, labelled_easy_vqa_images
from leo_mini_hf.easyvqa.object_named import (
    ANSWERS,
    DistinctObjectMosaicDataset,
    ObjectNamedMosaicDataset,
    balanced_values,
    named_blind_accuracy,
    object_named_dataset,
    object_named_training_mix,
)


def oracle(question: str, tiles: list[dict]) -> tuple[str, int | None]:
    """(answer, named cell) recomputed from the tiles' labels, independently of the generator's bookkeeping."""
    if match := re.fullmatch(r"What colour is the (\w+)\?", question):
        found = [i for i, tile in enumerate(tiles) if tile["shape"] == match.group(1)]
        assert len(found) == 1, f"'{question}': {len(found)} tiles hold that shape"
        return tiles[found[0]]["colour"], found[0]
    if match := re.fullmatch(r"What shape is the (\w+) one\?", question):
        found = [i for i, tile in enumerate(tiles) if tile["colour"] == match.group(1)]
        assert len(found) == 1, f"'{question}': {len(found)} tiles have that colour"
        return tiles[found[0]]["shape"], found[0]
    if match := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):
        colour, shape = match.groups()
        pairs = [(tile["colour"], tile["shape"]) for tile in tiles]
        # both answers need the binding: the colour on another shape and the shape in another colour are always there
        assert any(c == colour and s != shape for c, s in pairs) and any(s == shape and c != colour for c, s in pairs)
        found = [i for i, pair in enumerate(pairs) if pair == (colour, shape)]
        assert len(found) <= 1
        return ("yes", found[0]) if found else ("no", None)
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("grid", [2, 3])
def test_answers_and_named_cells_match_the_mosaic_and_answers_are_balanced(grid):
    dataset = ObjectNamedMosaicDataset("test", grid, size=240, seed=3)
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:
        question = sample["messages"][0]["content"][1]["text"]
        assert oracle(question, sample["tiles"]) == (sample["answer"], sample["named_cell"])
        assert sample["messages"][1]["content"][0]["text"] == sample["answer"]
    for kind, answers in ANSWERS.items():
        counts = Counter(s["answer"] for s in samples if s["question_type"] == kind)
        assert set(counts) == set(answers), kind
        assert max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


@pytest.mark.parametrize("grid, chance", [(2, {"colour": 1 / 4, "shape": 1 / 3}), (3, {"colour": 1 / 8, "shape": 1 / 3})])
def test_the_mosaics_attribute_counts_do_not_give_the_answer_away(grid, chance):
    """Answering with the commonest colour/shape scores about chance given what the mosaic shows (2×2: one of the 4
    colours present), and "yes" scores one half: only the tile the question names holds the answer."""
    blind = named_blind_accuracy(ObjectNamedMosaicDataset("test", grid, size=600, seed=0))
    assert blind["object colour of shape"] == pytest.approx(chance["colour"], abs=0.05)
    assert blind["object shape of colour"] == pytest.approx(chance["shape"], abs=0.05)
    assert blind["object colour and shape"] == 0.5


def test_balanced_values_hold_the_answer_with_an_even_histogram():
    import random

    rng = random.Random(0)
    for count, values in ((4, COLOURS), (9, COLOURS), (4, SHAPES), (9, SHAPES)):
        for answer in values:
            drawn = balanced_values(rng, values, answer, count)
            counts = Counter(drawn)
            assert len(drawn) == count and answer in counts and set(counts) <= set(values)
            if count < len(values):
                assert max(counts.values()) == 1  # distinct values
            else:
                assert max(counts.values()) - min(counts[value] for value in values) <= 1


def test_deterministic_split_pure_and_described():
    first, again = ObjectNamedMosaicDataset("test", 3, 30, seed=1), ObjectNamedMosaicDataset("test", 3, 30, seed=1)
    assert [first[i]["tiles"] for i in range(30)] == [again[i]["tiles"] for i in range(30)]
    assert [first[i]["tiles"] for i in range(10)] != [ObjectNamedMosaicDataset("test", 3, 30, seed=2)[i]["tiles"]
                                                      for i in range(10)]
    train_paths = {image.path for image in labelled_easy_vqa_images("train")}
    test_tiles = {tile["path"] for i in range(30) for tile in first[i]["tiles"]}
    assert test_tiles and not test_tiles & train_paths
    assert all(Path(path).parent.parent.name == "test" for path in test_tiles)
    assert first.description() == {"generator": "leo_mini_hf.easyvqa.object_named v1", "split": "test", "grid": 3,
                                   "size": 30, "seed": 1}
    # the position-question mosaics are unchanged by sharing their machinery (same generator, same samples)
    assert EasyVQAMosaicDataset("test", 2, 4, seed=0)[0]["question_type"] == "mosaic colour at cell"


def test_training_mix_is_a_seeded_easy_vqa_sample_then_2x2_and_3x3_mosaics():
    mix, description = object_named_training_mix(seed=5, size=40)
    sample, two, three = mix.datasets
    assert len(sample) == len(two) == len(three) == 40
    assert [(d.split, d.grid, d.seed) for d in (two, three)] == [("train", 2, 5), ("train", 3, 5)]
    assert description == {"easy-vqa": {"split": "train", "seeded_sample": 40, "seed": 5},
                           "mosaics": [two.description(), three.description()]}
    assert mix[40]["tiles"] == ObjectNamedMosaicDataset("train", 2, 40, seed=5)[0]["tiles"]
    assert sample.indices != object_named_training_mix(seed=6, size=40)[0].datasets[0].indices


# ---- the distinct layout: three objects of distinct shapes and colours, no odd one out ---------------------------

@pytest.mark.parametrize("grid", [2, 3])
def test_distinct_mosaics_hold_three_unique_objects_and_the_right_answer(grid):
    dataset = DistinctObjectMosaicDataset("test", grid, size=240, seed=3)
    samples = [dataset[i] for i in range(len(dataset))]
    for sample in samples:
        objects = [tile for tile in sample["tiles"] if tile["path"]]
        assert len(objects) == 3 and len(sample["tiles"]) == grid * grid
        assert sorted(tile["shape"] for tile in objects) == sorted(SHAPES)
        assert len({tile["colour"] for tile in objects}) == 3  # every colour in the mosaic unique too
        question = sample["messages"][0]["content"][1]["text"]
        if match := re.fullmatch(r"Is there a (\w+) (\w+)\?", question):  # both values always shown
            colour, shape = match.groups()
            assert {colour} <= {t["colour"] for t in objects} and {shape} <= {t["shape"] for t in objects}
            found = [i for i, t in enumerate(sample["tiles"]) if (t["colour"], t["shape"]) == (colour, shape)]
            assert (sample["answer"], sample["named_cell"]) == (("yes", found[0]) if found else ("no", None))
        else:
            assert oracle(question, sample["tiles"]) == (sample["answer"], sample["named_cell"])
    for kind, answers in ANSWERS.items():
        counts = Counter(s["answer"] for s in samples if s["question_type"] == kind)
        assert set(counts) == set(answers) and max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


def test_distinct_mosaics_give_a_question_blind_model_one_in_three():
    """No tile stands out: the commonest colour/shape (all tie) and the odd one out (every object is one) both give a
    random object's attribute, right one time in three; "yes" one time in two."""
    dataset = DistinctObjectMosaicDataset("test", 3, size=600, seed=0)
    blind = named_blind_accuracy(dataset)
    assert blind["object colour of shape"] == pytest.approx(1 / 3, abs=0.01)
    assert blind["object shape of colour"] == pytest.approx(1 / 3, abs=0.01)
    assert blind["object colour and shape"] == 0.5
    unique = ObjectNamedMosaicDataset("test", 3, size=600, seed=0)
    odd_one_out = [sum(Counter(t.shape for t in tiles)[t.shape] == 1 for t in tiles if t.path)
                   for tiles in (unique.draw(i)[0] for i in range(0, 600, 3))]
    assert sum(count == 1 for count in odd_one_out) / len(odd_one_out) > 0.9  # the layout: one stands out


def test_distinct_mosaics_are_deterministic_blank_and_selectable_by_layout():
    first = DistinctObjectMosaicDataset("test", 3, 12, seed=1)
    assert [first[i]["tiles"] for i in range(12)] == [DistinctObjectMosaicDataset("test", 3, 12, seed=1)[i]["tiles"]
                                                      for i in range(12)]
    assert first.description()["generator"] == "leo_mini_hf.easyvqa.object_named distinct v1"
    sample = first[0]
    image, side = sample["messages"][0]["content"][0]["image"], sample["messages"][0]["content"][0]["image"].width // 3
    for cell, tile in enumerate(sample["tiles"]):
        row, column = divmod(cell, 3)
        centre = image.getpixel((column * side + side // 2, row * side + side // 2))
        assert (centre == BLANK_BACKGROUND) == (not tile["path"]), cell
    train_paths = {image.path for image in labelled_easy_vqa_images("train")}
    assert not {tile["path"] for i in range(12) for tile in first[i]["tiles"] if tile["path"]} & train_paths
    assert isinstance(object_named_dataset("test", 2, 4, layout="distinct"), DistinctObjectMosaicDataset)
    assert type(object_named_dataset("test", 2, 4)) is ObjectNamedMosaicDataset
    with pytest.raises(ValueError, match="layout must be one of"):
        object_named_dataset("test", 2, 4, layout="sparse")
    mix, description = object_named_training_mix(seed=0, size=6, layout="distinct")
    assert [d.generator for d in mix.datasets[1:]] == [first.generator] * 2
    assert description["mosaics"][0]["generator"] == first.generator
