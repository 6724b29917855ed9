"""Object-named mosaics: easy-vqa mosaics whose question names one object by its content, not by its place.

"What colour is the circle?" (exactly one cell holds a circle), "What shape is the red one?" (exactly one cell is
red), "Is there a red circle?" (the mosaic holds a red shape that is not a circle and a circle that is not red, and
a red circle or not: the question binds colour to shape). The answer depends on one tile that the question
identifies by what it shows, so a reducer that keeps what the question names can answer from few tokens, and one
that pools the whole picture mixes the named tile with the others. Seeded and deterministic like every mosaic; test
mosaics are tiled from test images only; answers are balanced within each type.
"""

import random

from torch.utils.data import ConcatDataset, Subset

from .dataset import COLOURS, SHAPES, YES_NO, EasyVQADataset, evaluation_subset
from .mosaic import BLANK, EasyVQAMosaicDataset, commonest_attribute_accuracy

OBJECT_QUESTION_TYPES = ("colour of shape", "shape of colour", "colour and shape")
ANSWERS = {"object colour of shape": COLOURS, "object shape of colour": SHAPES, "object colour and shape": YES_NO}
OBJECT_GENERATOR = "leo_mini_hf.easyvqa.object_named v1"  # recorded with results; the samples it names are unchanged
DISTINCT_GENERATOR = "leo_mini_hf.easyvqa.object_named distinct v1"


class ObjectNamedMosaicDataset(EasyVQAMosaicDataset):
    """`size` chat samples, each a `grid`×`grid` mosaic with one question that names an object by its shape, its
    colour or both. Samples also hold `named_cell`: the cell of the object asked about (None for a "no")."""

    question_types = OBJECT_QUESTION_TYPES
    type_prefix = "object"
    generator = OBJECT_GENERATOR

    def _colour_of_shape(self, rng: random.Random, answer_index: int):
        tiles, shape, colour, cell = self._one_named_tile(rng, answer_index, asked="colour")
        return tiles, f"What colour is the {shape}?", colour, cell

    def _shape_of_colour(self, rng: random.Random, answer_index: int):
        tiles, colour, shape, cell = self._one_named_tile(rng, answer_index, asked="shape")
        return tiles, f"What shape is the {colour} one?", shape, cell

    def _one_named_tile(self, rng: random.Random, answer_index: int, asked: str):
        """Tiles where exactly one cell has the named value of the other attribute; the answer is that cell's `asked`
        attribute ("colour" or "shape"), and the `asked` histogram is even (`balanced_values`). Returns (tiles,
        named value, answer, cell)."""
        named = "shape" if asked == "colour" else "colour"
        values = {"colour": COLOURS, "shape": SHAPES}
        answer, named_value = values[asked][answer_index % len(values[asked])], rng.choice(values[named])
        asked_values = balanced_values(rng, values[asked], answer, len(self.cells))
        cell = rng.choice([i for i, value in enumerate(asked_values) if value == answer])
        others = [value for value in values[named] if value != named_value]
        columns = {asked: asked_values,
                   named: [named_value if i == cell else rng.choice(others) for i in range(len(self.cells))]}
        return self._tiles(rng, columns["shape"], columns["colour"]), named_value, answer, cell

    def _tiles(self, rng: random.Random, shapes: list[str], colours: list[str]) -> list:
        return [self._pick(rng, lambda image, s=s, c=c: (image.shape, image.colour) == (s, c))
                for s, c in zip(shapes, colours)]

    def _colour_and_shape(self, rng: random.Random, answer_index: int):
        """Both a yes and a no mosaic hold the colour (on another shape) and the shape (in another colour): only
        binding the two tells the answers apart."""
        answer = YES_NO[answer_index % len(YES_NO)]
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        decoys = [self._pick(rng, lambda image: image.colour == colour and image.shape != shape),
                  self._pick(rng, lambda image: image.shape == shape and image.colour != colour)]
        if answer == "yes":
            decoys.append(self._pick(rng, lambda image: (image.shape, image.colour) == (shape, colour)))
        cells = rng.sample(range(len(self.cells)), len(decoys))
        tiles = self._fill(rng, dict(zip(cells, decoys)),
                           keep=lambda image: (image.shape, image.colour) != (shape, colour))
        return tiles, f"Is there a {colour} {shape}?", answer, cells[2] if answer == "yes" else None


class DistinctObjectMosaicDataset(ObjectNamedMosaicDataset):
    """The object-named questions without an odd one out: every mosaic holds three objects, one of each shape, in
    three different colours, in random cells; the other cells are blank background. Every shape and every colour in
    the mosaic is unique, so no tile stands out unless the question names it: a model that does not read which object
    is named answers "colour of the <shape>" right about one time in three (the issue's layout lets such a model
    score 0.65 / 0.97 on 2×2 / 3×3, benchmarks/results/object-named/shortcut.md)."""

    generator = DISTINCT_GENERATOR

    def _placed(self, rng: random.Random, objects: list[tuple[str, str]]) -> tuple[list, list[int]]:
        """(shape, colour) objects → tiles with each object in a random cell, blanks elsewhere; and their cells."""
        cells = rng.sample(range(len(self.cells)), len(objects))
        placed = {cell: self._pick(rng, lambda image, o=obj: (image.shape, image.colour) == o)
                  for cell, obj in zip(cells, objects)}
        return [placed.get(cell, BLANK) for cell in range(len(self.cells))], cells

    def _three_objects(self, rng: random.Random, shape: str, colour: str) -> list[tuple[str, str]]:
        """(shape, colour) first, then the other two shapes in two other, different colours."""
        others = rng.sample([value for value in COLOURS if value != colour], 2)
        return [(shape, colour), *zip([value for value in SHAPES if value != shape], others)]

    def _colour_of_shape(self, rng: random.Random, answer_index: int):
        colour, shape = COLOURS[answer_index % len(COLOURS)], rng.choice(SHAPES)
        tiles, cells = self._placed(rng, self._three_objects(rng, shape, colour))
        return tiles, f"What colour is the {shape}?", colour, cells[0]

    def _shape_of_colour(self, rng: random.Random, answer_index: int):
        shape, colour = SHAPES[answer_index % len(SHAPES)], rng.choice(COLOURS)
        tiles, cells = self._placed(rng, self._three_objects(rng, shape, colour))
        return tiles, f"What shape is the {colour} one?", shape, cells[0]

    def _colour_and_shape(self, rng: random.Random, answer_index: int):
        """"Is there a <colour> <shape>?": both named values are always in the mosaic, on one object ("yes") or on
        two different ones ("no")."""
        answer = YES_NO[answer_index % len(YES_NO)]
        colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
        if answer == "yes":
            objects = self._three_objects(rng, shape, colour)
        else:
            other_shape, third_shape = rng.sample([value for value in SHAPES if value != shape], 2)
            other_colour, third_colour = rng.sample([value for value in COLOURS if value != colour], 2)
            objects = [(shape, other_colour), (other_shape, colour), (third_shape, third_colour)]
        tiles, cells = self._placed(rng, objects)
        return tiles, f"Is there a {colour} {shape}?", answer, cells[0] if answer == "yes" else None


# the object-named layouts: the ("unique": one tile of the named value) and the one without an odd one out
LAYOUT_DATASETS = {"unique": ObjectNamedMosaicDataset, "distinct": DistinctObjectMosaicDataset}
LAYOUTS = tuple(LAYOUT_DATASETS)


def object_named_dataset(split: str, grid: int, size: int, seed: int = 0, layout: str = "unique"):
    """The object-named mosaics of `layout`: "unique" (the issue's: one tile of the named value, the other cells
    filled) or "distinct" (three objects of distinct shapes and colours, blanks elsewhere)."""
    if layout not in LAYOUT_DATASETS:
        raise ValueError(f"object-named layout must be one of {LAYOUTS}, got {layout!r}")
    return LAYOUT_DATASETS[layout](split, grid, size=size, seed=seed)


def balanced_values(rng: random.Random, values: tuple[str, ...], answer: str, count: int) -> list[str]:
    """`count` values in random order, holding `answer`, with a histogram as even as it can be and otherwise
    independent of `answer`: fewer cells than values, `answer` and distinct others; else each value `count // len`
    times plus `count % len` distinct values drawn uniformly (the answer among them or not). So how often each value
    shows in the mosaic says nothing about which one is asked for."""
    if count < len(values):
        chosen = [answer, *rng.sample([value for value in values if value != answer], count - 1)]
    else:
        chosen = [*values] * (count // len(values)) + rng.sample(values, count % len(values))
    rng.shuffle(chosen)
    return chosen


def named_blind_accuracy(dataset: ObjectNamedMosaicDataset) -> dict[str, float]:
    """What a model scores that reads the mosaic's attributes but not which object the question names: the commonest
    colour (shape) of the mosaic for "colour of shape" ("shape of colour"); "yes" for "colour and shape", since every
    such mosaic holds the colour and the shape named. Returns question type → expected accuracy."""
    blind = commonest_attribute_accuracy(dataset, {"object colour of shape": "colour",
                                                   "object shape of colour": "shape"})
    binding = [dataset.draw(i)[2] == "yes" for i in range(len(dataset))
               if dataset.draw(i)[3] == "object colour and shape"]
    if binding:
        blind["object colour and shape"] = sum(binding) / len(binding)
    return blind


def object_named_training_mix(seed: int = 0, size: int = 4000, layout: str = "unique") -> tuple[ConcatDataset, dict]:
    """The object-named task's training set: a seeded sample of `size` easy-vqa train questions, then `size` 2×2 and
    `size` 3×3 object-named train mosaics of `layout`. Returns the dataset and what regenerates it (recorded with
    results)."""
    plain = EasyVQADataset("train")
    sample = Subset(plain, evaluation_subset(plain, size, seed))
    mosaics = [object_named_dataset("train", grid, size, seed, layout) for grid in (2, 3)]
    description = {"easy-vqa": {"split": "train", "seeded_sample": size, "seed": seed},
                   "mosaics": [m.description() for m in mosaics]}
    return ConcatDataset([sample, *mosaics]), description
