"""The lmms-eval side of the local tasks: a task class that builds its documents from the easy-vqa package and the
mosaic generator (no download, no Hub), the prompt and image of a document, and exact-match scoring as `leo-mini
eval` scores (`normalise_answer`)."""

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from ..easyvqa.dataset import EasyVQADataset
from ..easyvqa.evaluation import normalise_answer
from ..easyvqa.object_named import MOSAIC_DATASETS


class EasyVQATask(ConfigurableTask):
    """Documents from `dataset_kwargs`: {source: easy-vqa, split} or {source: object | object-distinct | mosaic, split,
    grid, size, seed}, in the order `leo-mini eval` reads them (so `--limit N` takes the same first N questions)."""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        documents = easy_vqa_documents(**dict(dataset_kwargs or {}))
        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(documents)})
        self.dataset_no_image = self.dataset  # documents hold no images: doc_to_visual rebuilds them


def easy_vqa_documents(source: str = "easy-vqa", split: str = "test", grid: int = 2, size: int = 600,
                       seed: int = 0) -> list[dict]:
    """One dict per question: question, answer, question type, and what rebuilds its image."""
    if source == "easy-vqa":
        dataset = EasyVQADataset(split)
        return [{"question": question, "answer": answer, "image_path": str(path), "question_type": ""}
                for question, answer, path in dataset.samples]
    if source not in MOSAIC_DATASETS:
        raise ValueError(f"easy-vqa task source must be 'easy-vqa' or one of {sorted(MOSAIC_DATASETS)}, got {source!r}")
    dataset = MOSAIC_DATASETS[source](split, grid, size=size, seed=seed)
    documents = []
    for index in range(len(dataset)):
        _, question, answer, question_type = dataset.draw(index)
        documents.append({"question": question, "answer": answer, "question_type": question_type,
                          "mosaic": {"source": source, "split": split, "grid": grid, "size": size, "seed": seed,
                                     "index": index}})
    return documents


def doc_to_visual(doc: dict) -> list[Image.Image]:
    if "image_path" in doc:
        with Image.open(doc["image_path"]) as image:
            return [image.convert("RGB")]
    mosaic = doc["mosaic"]
    dataset = MOSAIC_DATASETS[mosaic["source"]](mosaic["split"], mosaic["grid"], size=mosaic["size"],
                                                seed=mosaic["seed"])
    return [dataset[mosaic["index"]]["messages"][0]["content"][0]["image"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(normalise_answer(results[0]) == doc["answer"])}
