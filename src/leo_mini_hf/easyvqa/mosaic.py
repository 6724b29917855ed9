"""easy-vqa mosaics: 2×2 or 3×3 tiles of easy-vqa images, with questions whose answer depends on one cell.

easy-vqa shows one shape per image, so no question there decides *where* to look. A mosaic does: "What colour is
the shape in the top-left?", "What shape is in the bottom-right?", "Where is the red circle?", "How many red shapes
are there?". Every sample is a pure function of (split, grid, seed, index) — deterministic and seeded — and test
mosaics are tiled from test images only. Answers are balanced: each sample first fixes its answer, then
builds a mosaic that has it. Answers cycle through each type's answer set with the sample index, so any run of
consecutive samples is balanced to within one per answer.
"""

import random
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from functools import lru_cache

from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from .dataset import COLOURS, SHAPES, EasyVQADataset, load_split

CELL_NAMES = {
    2: ("top-left", "top-right", "bottom-left", "bottom-right"),
    3: ("top-left", "top-centre", "top-right", "centre-left", "centre", "centre-right", "bottom-left",
        "bottom-centre", "bottom-right"),
}
QUESTION_TYPES = ("colour at cell", "shape at cell", "where", "count")
MAX_COUNT = 4  # "how many" answers are 0..MAX_COUNT (fewer cells than that: 0..cells)
GENERATOR = "leo_mini_hf.training.mosaic v1"  # recorded with results; the samples it names are unchanged


@dataclass(frozen=True)
class LabelledImage:
    path: str
    shape: str
    colour: str


BLANK = LabelledImage(path="", shape="", colour="")  # an empty cell: plain background, no shape
BLANK_BACKGROUND = (246, 246, 246)  # near the easy-vqa images' own near-white backgrounds


@lru_cache(maxsize=2)
def labelled_easy_vqa_images(split: str) -> tuple[LabelledImage, ...]:
    """The split's images whose shape and colour the easy-vqa questions determine (88% of them), by image id.

    Labels come from the questions: a shape or colour answer, a shape or colour named in a wh-question, and the
    attribute a yes/no question affirms ("is there a red shape?" yes; "is there not a red shape?" no).
    """
    questions, answers, image_ids, paths = load_split(split)
    facts = defaultdict(lambda: {"shape": set(), "colour": set()})
    for question, answer, image_id in zip(questions, answers, image_ids):
        words = set(re.findall(r"[a-z]+", question.lower()))
        named = [word for word in words if word in SHAPES or word in COLOURS]
        if answer in SHAPES or answer in COLOURS:
            affirmed = [answer, *named]
        else:
            affirmed = named if (answer == "yes") != bool(words & {"not", "no"}) else []
        for value in affirmed:
            facts[image_id]["shape" if value in SHAPES else "colour"].add(value)
    images = []
    for image_id in sorted(paths):
        shapes, colours = facts[image_id]["shape"], facts[image_id]["colour"]
        if len(shapes) > 1 or len(colours) > 1:
            raise ValueError(f"easy-vqa {split} image {image_id}: contradictory labels {shapes} {colours}")
        if shapes and colours:
            images.append(LabelledImage(paths[image_id], next(iter(shapes)), next(iter(colours))))
    return tuple(images)


class EasyVQAMosaicDataset(Dataset):
    """`size` chat samples, each a `grid`×`grid` mosaic of one split's easy-vqa images and one question about it.

    Each sample holds its `tiles` (row-major path, shape, colour), `answer` and `question_type`.
    Question types cycle through `question_types` (index % types) and answers through each type's answer set
    (index // types); everything else (cells, other tiles, the colour counted) is drawn from a per-sample seeded RNG.
    Subclasses ask other questions: they set `question_types`, `type_prefix` and their own `generator`, and define a
    `_<type>(rng, answer_index)` method per type returning (tiles, question, answer, named cell or None).
    """

    question_types = QUESTION_TYPES
    type_prefix = "mosaic"
    generator = GENERATOR

    def __init__(self, split: str = "train", grid: int = 2, size: int = 1000, seed: int = 0):
        if grid not in CELL_NAMES:
            raise ValueError(f"mosaic grid must be one of {sorted(CELL_NAMES)}, got {grid!r}")
        if size < 1:
            raise ValueError(f"mosaic dataset size must be positive, got {size}")
        self.split, self.grid, self.size, self.seed = split, grid, size, seed
        self.images = labelled_easy_vqa_images(split)
        self.cells = CELL_NAMES[grid]

    def description(self) -> dict:
        """What regenerates this dataset exactly (recorded with results)."""
        return {"generator": self.generator, "split": self.split, "grid": self.grid, "size": self.size, "seed": self.seed}

    def __len__(self) -> int:
        return self.size

    def draw(self, index: int) -> tuple[list[LabelledImage], str, str, str]:
        """Sample `index` without its picture: (tiles in row-major order, question, answer, question type)."""
        return self.draw_with_named_cell(index)[:4]

    def draw_with_named_cell(self, index: int) -> tuple[list[LabelledImage], str, str, str, int | None]:
        """`draw`, plus the cell (row-major) holding the one object the question is about, or None if there is none
        (counting, a "no" answer)."""
        if not 0 <= index < self.size:
            raise IndexError(f"mosaic index {index} out of range for {self.size} samples")
        rng = random.Random(f"{self.generator}/{self.split}/{self.grid}/{self.seed}/{index}")
        question_type = self.question_types[index % len(self.question_types)]
        answer_index = index // len(self.question_types)  # answers cycle: balanced to within one per type
        tiles, question, answer, named_cell = getattr(self, "_" + question_type.replace(" ", "_"))(rng, answer_index)
        return tiles, question, answer, f"{self.type_prefix} {question_type}", named_cell

    def __getitem__(self, index: int) -> dict:
        tiles, question, answer, question_type, named_cell = self.draw_with_named_cell(index)
        return {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": self._compose(tiles)},
                                             {"type": "text", "text": question}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
            ],
            "answer": answer,
            "question_type": question_type,
            "tiles": [asdict(tile) for tile in tiles],  # row-major: path, shape, colour
            "named_cell": named_cell,
        }

    def _pick(self, rng: random.Random, keep) -> LabelledImage:
        return rng.choice([image for image in self.images if keep(image)])

    def _fill(self, rng: random.Random, fixed: dict[int, LabelledImage], keep=lambda image: True) -> list:
        return [fixed[cell] if cell in fixed else self._pick(rng, keep) for cell in range(len(self.cells))]

    def _colour_at_cell(self, rng, answer_index):
        colour, cell = COLOURS[answer_index % len(COLOURS)], rng.randrange(len(self.cells))
        tiles = self._fill(rng, {cell: self._pick(rng, lambda image: image.colour == colour)})
        return tiles, f"What colour is the shape in the {self.cells[cell]}?", colour, cell

    def _shape_at_cell(self, rng, answer_index):
        shape, cell = SHAPES[answer_index % len(SHAPES)], rng.randrange(len(self.cells))
        tiles = self._fill(rng, {cell: self._pick(rng, lambda image: image.shape == shape)})
        return tiles, f"What shape is in the {self.cells[cell]}?", shape, cell

    def _where(self, rng, answer_index):
        cell = answer_index % len(self.cells)
        target = self._pick(rng, lambda image: True)
        tiles = self._fill(rng, {cell: target},
                           keep=lambda image: (image.shape, image.colour) != (target.shape, target.colour))
        return tiles, f"Where is the {target.colour} {target.shape}?", self.cells[cell], cell

    def _count(self, rng, answer_index):
        colour, count = rng.choice(COLOURS), answer_index % (min(MAX_COUNT, len(self.cells)) + 1)
        chosen = set(rng.sample(range(len(self.cells)), count))
        tiles = self._fill(rng, {cell: self._pick(rng, lambda image: image.colour == colour) for cell in chosen},
                           keep=lambda image: image.colour != colour)
        return tiles, f"How many {colour} shapes are there?", str(count), None

    def _compose(self, tiles: list[LabelledImage]) -> Image.Image:
        side = _load_tile(next(tile for tile in tiles if tile != BLANK).path).width
        mosaic = Image.new("RGB", (side * self.grid, side * self.grid), BLANK_BACKGROUND)
        for cell, tile in enumerate(tiles):
            if tile != BLANK:
                row, column = divmod(cell, self.grid)
                mosaic.paste(_load_tile(tile.path), (column * side, row * side))
        return mosaic


def location_blind_accuracy(dataset: EasyVQAMosaicDataset) -> dict[str, float]:
    """The "at cell" questions' score without knowing where the cell is: answer with the attribute most frequent in
    the whole mosaic (ties split evenly). A mosaic always holds its answer, so this beats uniform chance; a model
    that reads attributes but not locations scores about this. Returns question type → expected accuracy."""
    return commonest_attribute_accuracy(dataset, {"mosaic colour at cell": "colour", "mosaic shape at cell": "shape"})


def commonest_attribute_accuracy(dataset: EasyVQAMosaicDataset, attribute_of_type: dict[str, str]) -> dict[str, float]:
    """Expected accuracy of answering each question whose type is in `attribute_of_type` with that attribute
    ("shape" or "colour") most frequent in the whole mosaic, ties split evenly: what a model scores that reads the
    mosaic's attributes but not which tile the question is about. Returns question type → expected accuracy."""
    scores = defaultdict(list)
    for index in range(len(dataset)):
        tiles, _, answer, question_type = dataset.draw(index)
        attribute = attribute_of_type.get(question_type)
        if attribute is None:
            continue
        counts = Counter(getattr(tile, attribute) for tile in tiles if tile != BLANK)
        most_frequent = [value for value, count in counts.items() if count == max(counts.values())]
        scores[question_type].append((answer in most_frequent) / len(most_frequent))
    return {question_type: sum(values) / len(values) for question_type, values in scores.items()}


def mosaic_training_mix(seed: int = 0) -> tuple[ConcatDataset, dict]:
    """The mosaic task's training set: easy-vqa train, then as many 2×2 and as many 3×3 train mosaics (a third
    each). Returns the dataset and what regenerates it (recorded with results)."""
    plain = EasyVQADataset("train")
    mosaics = [EasyVQAMosaicDataset("train", grid, size=len(plain), seed=seed) for grid in (2, 3)]
    return ConcatDataset([plain, *mosaics]), {"easy-vqa": "train", "mosaics": [m.description() for m in mosaics]}


@lru_cache(maxsize=8192)
def _load_tile(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
