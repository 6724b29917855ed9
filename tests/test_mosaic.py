"""easy-vqa mosaics: deterministic, split-pure, balanced, and every answer right about its own mosaic."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leo_mini_hf.easyvqa.mosaic import (
    CELL_NAMES,
    COLOURS,
    SHAPES,
    EasyVQAMosaicDataset,
    LabelledImage,
    labelled_easy_vqa_images,
    location_blind_accuracy,
    mosaic_training_mix,
)


def oracle_answer(question: str, tiles: list[dict], grid: int) -> str:
    """The answer recomputed from the tiles' labels (independently of the generator's own bookkeeping)."""
    cells = CELL_NAMES[grid]
    if match := re.fullmatch(r"What colour is the shape in the (.+)\?", question):
        return tiles[cells.index(match.group(1))]["colour"]
    if match := re.fullmatch(r"What shape is in the (.+)\?", question):
        return tiles[cells.index(match.group(1))]["shape"]
    if match := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        found = [cells[i] for i, t in enumerate(tiles) if (t["colour"], t["shape"]) == match.groups()]
        assert len(found) == 1, f"'{question}' is not unique: {found}"
        return found[0]
    if match := re.fullmatch(r"How many (\w+) shapes are there\?", question):
        return str(sum(t["colour"] == match.group(1) for t in tiles))
    raise AssertionError(f"unexpected question {question!r}")


@pytest.mark.parametrize("grid", [2, 3])
def test_answers_match_the_mosaic_and_are_balanced(grid):
    samples = [EasyVQAMosaicDataset("test", grid, size=240, seed=3)[i] for i in range(240)]
    for sample in samples:
        question = sample["messages"][0]["content"][1]["text"]
        assert oracle_answer(question, sample["tiles"], grid) == sample["answer"] == \
            sample["messages"][1]["content"][0]["text"]
    answer_sets = {"mosaic colour at cell": COLOURS, "mosaic shape at cell": SHAPES, "mosaic where": CELL_NAMES[grid],
                   "mosaic count": [str(n) for n in range(5)]}
    for kind, answers in answer_sets.items():
        counts = Counter(s["answer"] for s in samples if s["question_type"] == kind)
        assert set(counts) == set(answers), kind
        assert max(counts.values()) - min(counts.values()) <= 1, (kind, counts)


def test_the_picture_is_the_tiles_in_row_major_order():
    sample = EasyVQAMosaicDataset("train", 3, size=8, seed=0)[5]
    mosaic = np.asarray(sample["messages"][0]["content"][0]["image"])
    side = mosaic.shape[0] // 3
    for cell, tile in enumerate(sample["tiles"]):
        row, column = divmod(cell, 3)
        expected = np.asarray(Image.open(tile["path"]).convert("RGB"))
        assert np.array_equal(mosaic[row * side:(row + 1) * side, column * side:(column + 1) * side], expected)


def test_deterministic_per_seed_and_splits_kept_apart():
    first, again = EasyVQAMosaicDataset("test", 2, 50, seed=1), EasyVQAMosaicDataset("test", 2, 50, seed=1)
    other_seed = EasyVQAMosaicDataset("test", 2, 50, seed=2)
    for index in (0, 17, 49):
        a, b = first[index], again[index]
        assert a["tiles"] == b["tiles"] and a["answer"] == b["answer"]
        assert a["messages"][0]["content"][0]["image"].tobytes() == b["messages"][0]["content"][0]["image"].tobytes()
    assert [first[i]["tiles"] for i in range(10)] != [other_seed[i]["tiles"] for i in range(10)]
    train_paths = {image.path for image in labelled_easy_vqa_images("train")}
    test_tiles = {tile["path"] for i in range(50) for tile in first[i]["tiles"]}
    assert test_tiles and not test_tiles & train_paths
    assert all(Path(path).parent.parent.name == "test" for path in test_tiles)
    assert first.description() == {"generator": "leo_mini_hf.training.mosaic v1", "split": "test", "grid": 2,
                                   "size": 50, "seed": 1}


def test_labels_are_consistent_with_the_easy_vqa_questions():
    images = labelled_easy_vqa_images("test")
    assert len(images) > 800 and {image.colour for image in images} == set(COLOURS)
    assert {image.shape for image in images} == set(SHAPES)


@pytest.mark.parametrize("arguments, match", [({"grid": 4}, "grid"), ({"size": 0}, "size"),
                                               ({"split": "validation"}, "split")])
def test_bad_arguments_raise(arguments, match):
    with pytest.raises(ValueError, match=match):
        EasyVQAMosaicDataset(**arguments)


def test_index_out_of_range_raises():
    with pytest.raises(IndexError):
        EasyVQAMosaicDataset("test", 2, size=3)[3]


def test_draw_is_the_sample_without_its_picture():
    dataset = EasyVQAMosaicDataset("test", 3, size=8, seed=0)
    for index in range(8):
        tiles, question, answer, question_type = dataset.draw(index)
        sample = dataset[index]
        assert [vars(tile) for tile in tiles] == sample["tiles"] and answer == sample["answer"]
        assert question == sample["messages"][0]["content"][1]["text"] and question_type == sample["question_type"]


class HandMadeMosaics:
    """Mosaics given as (shapes, colour, question type, answer): what location_blind_accuracy reads."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def draw(self, index):
        shapes, colour, question_type, answer = self.rows[index]
        return [LabelledImage(f"{i}.png", shape, colour) for i, shape in enumerate(shapes)], "?", answer, question_type


def test_location_blind_accuracy_answers_with_the_most_frequent_attribute():
    shape, colour = "mosaic shape at cell", "mosaic colour at cell"
    mosaics = HandMadeMosaics([
        (["circle", "circle", "rectangle", "triangle"], "red", shape, "circle"),      # majority: right
        (["circle", "circle", "rectangle", "triangle"], "red", shape, "triangle"),    # majority: wrong
        (["circle", "circle", "rectangle", "rectangle"], "red", shape, "rectangle"),  # tie of two: half
        (["circle"] * 4, "blue", colour, "blue"),                                     # one colour: right
        (["circle"] * 4, "blue", "mosaic count", "4"),                                # not a cell question
    ])
    assert location_blind_accuracy(mosaics) == {shape: pytest.approx(0.5), colour: 1.0}


def test_location_blind_accuracy_beats_chance_on_real_mosaics():
    """A mosaic always holds its answer, so guessing the commonest attribute beats 1/3 (shape) and 1/8 (colour)."""
    blind = location_blind_accuracy(EasyVQAMosaicDataset("test", 2, size=200, seed=0))
    assert blind["mosaic shape at cell"] > 1 / len(SHAPES) + 0.1
    assert blind["mosaic colour at cell"] > 1 / len(COLOURS) + 0.1


def test_training_mix_is_easy_vqa_then_equal_thirds_of_seeded_train_mosaics():
    mix, description = mosaic_training_mix(seed=3)
    plain, two, three = mix.datasets
    assert len(plain) == len(two) == len(three) == len(mix) // 3
    assert [(d.split, d.grid, d.seed) for d in (two, three)] == [("train", 2, 3), ("train", 3, 3)]
    assert description == {"easy-vqa": "train", "mosaics": [two.description(), three.description()]}
    first_mosaic = EasyVQAMosaicDataset("train", 2, size=len(plain), seed=3)[0]
    assert mix[len(plain)]["tiles"] == first_mosaic["tiles"] and mix[len(plain)]["answer"] == first_mosaic["answer"]
