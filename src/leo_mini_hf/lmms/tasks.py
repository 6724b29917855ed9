"""The lmms-eval side of the local tasks: a task class that builds its documents from an evaluation dataset of the
registry (`leo_mini_hf.easyvqa.registry`: the easy-vqa package and the mosaic generators; no download, no Hub), the
prompt and image of a document, and exact-match scoring as `leo-mini eval` scores (the dataset's `normalise`)."""

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask
from PIL import Image

from ..easyvqa.dataset import EasyVQADataset
from ..easyvqa.registry import EVALUATION_DATASETS, evaluation_dataset


class EasyVQATask(ConfigurableTask):
    """Documents from `dataset_kwargs`: {dataset: a registered evaluation dataset's name, split, and for a seeded set
    size, seed}, in the order `leo-mini eval` reads them (so `--limit N` takes the same first N questions)."""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        documents = easy_vqa_documents(**dict(dataset_kwargs or {}))
        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(documents)})
        self.dataset_no_image = self.dataset  # documents hold no images: doc_to_visual rebuilds them


def easy_vqa_documents(dataset: str = "easy-vqa", split: str = "test", size: int = 600, seed: int = 0) -> list[dict]:
    """One dict per question: question, answer, question type, and what rebuilds its image."""
    built = evaluation_dataset(dataset, split, size, seed)
    if isinstance(built, EasyVQADataset):
        return [{"question": question, "answer": answer, "image_path": str(path), "question_type": "",
                 "dataset": dataset} for question, answer, path in built.samples]
    documents = []
    for index in range(len(built)):
        _, question, answer, question_type = built.draw(index)
        documents.append({"question": question, "answer": answer, "question_type": question_type, "dataset": dataset,
                          "mosaic": {"split": split, "size": size, "seed": seed, "index": index}})
    return documents


def doc_to_visual(doc: dict) -> list[Image.Image]:
    if "image_path" in doc:
        with Image.open(doc["image_path"]) as image:
            return [image.convert("RGB")]
    mosaic = doc["mosaic"]
    mosaics = evaluation_dataset(doc["dataset"], mosaic["split"], mosaic["size"], mosaic["seed"])
    return [mosaics[mosaic["index"]]["messages"][0]["content"][0]["image"]]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return doc["answer"]


def process_results(doc: dict, results: list[str]) -> dict:
    normalise = EVALUATION_DATASETS[doc["dataset"]].normalise
    return {"exact_match": float(normalise(results[0]) == doc["answer"])}
