"""The `easy-vqa` package's questions as chat samples."""

import random
from dataclasses import dataclass, field

from torch.utils.data import Dataset

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")
YES_NO = ("yes", "no")


def question_type(answer: str) -> str:
    """easy-vqa's three kinds of question, told apart by their answers."""
    return "shape" if answer in SHAPES else "yes/no" if answer in YES_NO else "colour"


def normalise_answer(text: str) -> str:
    """A generated answer as it is compared with easy-vqa's: its first line, without end punctuation, lower case."""
    return text.strip().split("\n")[0].strip().strip(".!").lower()


def evaluation_subset(dataset, limit: int | None, seed: int = 0) -> list[int]:
    """A fixed, seeded sample of indices (the whole split when `limit` is None)."""
    indices = list(range(len(dataset)))
    if limit is not None and limit < len(indices):
        indices = sorted(random.Random(seed).sample(indices, limit))
    return indices


def load_split(split: str) -> tuple[list[str], list[str], list[int], dict[int, str]]:
    """(questions, answers, image ids, image id → path) of easy-vqa's `split` ("train" or "test")."""
    import easy_vqa  # the data package; installs a stray top-level `test` package — never put it on sys.path

    if split not in ("train", "test"):
        raise ValueError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    return questions, answers, image_ids, getattr(easy_vqa, f"get_{split}_image_paths")()


@dataclass
class EasyVQADataset(Dataset):
    """The `easy-vqa` package's questions (64×64 images of one coloured shape) as single-turn chat samples."""

    split: str = "train"
    limit: int | None = None
    samples: list = field(default_factory=list, init=False)

    def __post_init__(self):
        questions, answers, image_ids, image_paths = load_split(self.split)
        self.samples = [(q, a, image_paths[i]) for q, a, i in zip(questions, answers, image_ids)][: self.limit]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        question, answer, image_path = self.samples[index]
        return {"messages": [
            {"role": "user", "content": [{"type": "image", "path": str(image_path)}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ], "answer": answer}
