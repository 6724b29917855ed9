"""Every evaluation dataset by the one name that `leo-mini eval --dataset`, the lmms-eval tasks and the benchmarks
use. Adding a dataset is adding one entry here (and, for lmms-eval, its task YAML, which a test checks against it)."""

from dataclasses import dataclass
from typing import Callable

from torch.utils.data import Dataset

from .dataset import EasyVQADataset, normalise_answer
from .mosaic import QUESTION_TYPES as CELL_QUESTION_TYPES
from .mosaic import EasyVQAMosaicDataset
from .object_named import OBJECT_QUESTION_TYPES, DistinctObjectMosaicDataset, ObjectNamedMosaicDataset


@dataclass(frozen=True)
class EvaluationDataset:
    """One evaluation dataset. `build(split, size, seed)` makes it: a fixed split of which `leo-mini eval` takes a
    seeded sample of `--limit` (`sampled`), or a seeded set of `size` questions that is the sample itself.
    `question_types`: what its samples' `question_type` may be; `normalise`: how an answer is compared;
    `lmms_eval_task`: its lmms-eval task name, or None."""

    name: str
    build: Callable[[str, int, int], Dataset]
    question_types: tuple[str, ...]
    sampled: bool = False
    normalise: Callable[[str], str] = normalise_answer
    lmms_eval_task: str | None = None


def _mosaics(dataset_class, grid: int):
    return lambda split, size, seed: dataset_class(split, grid, size=size, seed=seed)


def _entries():
    yield EvaluationDataset("easy-vqa", lambda split, size, seed: EasyVQADataset(split), ("colour", "shape", "yes/no"),
                            sampled=True, lmms_eval_task="easy_vqa")
    for grid in (2, 3):
        yield EvaluationDataset(f"mosaic-{grid}x{grid}", _mosaics(EasyVQAMosaicDataset, grid),
                                tuple(f"mosaic {kind}" for kind in CELL_QUESTION_TYPES))
        object_types = tuple(f"object {kind}" for kind in OBJECT_QUESTION_TYPES)
        yield EvaluationDataset(f"object-{grid}x{grid}", _mosaics(ObjectNamedMosaicDataset, grid), object_types,
                                lmms_eval_task=f"easy_vqa_object_{grid}x{grid}")
        yield EvaluationDataset(f"object-distinct-{grid}x{grid}", _mosaics(DistinctObjectMosaicDataset, grid),
                                object_types, lmms_eval_task=f"easy_vqa_object_distinct_{grid}x{grid}")


EVALUATION_DATASETS = {entry.name: entry for entry in _entries()}


def evaluation_dataset(name: str, split: str = "test", size: int = 400, seed: int = 0) -> Dataset:
    """The dataset registered as `name`, built for `split` (a seeded set of `size` questions where it is one)."""
    if name not in EVALUATION_DATASETS:
        raise ValueError(f"Unknown evaluation dataset {name!r}; available: {', '.join(EVALUATION_DATASETS)}")
    return EVALUATION_DATASETS[name].build(split, size, seed)
