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


def test_one_registry_names_every_evaluation_dataset_for_the_cli_and_lmms_eval():
    """The registry is the one list: `leo-mini eval --dataset` offers exactly its names, each entry builds samples of
    its declared question types, and each lmms-eval task YAML names the registry entry whose task it is."""
    import yaml

    from leo_mini_hf.easyvqa.registry import EVALUATION_DATASETS, evaluation_dataset
    from leo_mini_hf.lmms import TASKS_DIR

    for name, entry in EVALUATION_DATASETS.items():
        dataset = evaluation_dataset(name, "test", size=6)
        kinds = {dataset[i].get("question_type") or entry.question_types[0] for i in range(min(6, len(dataset)))}
        assert kinds <= set(entry.question_types), (name, kinds)
    tasks = {}
    for path in TASKS_DIR.glob("*.yaml"):
        config = yaml.load(path.read_text(), Loader=yaml.BaseLoader)  # `!function` tags read as plain strings
        tasks[config["task"]] = config["dataset_kwargs"]["dataset"]
    assert tasks == {entry.lmms_eval_task: name for name, entry in EVALUATION_DATASETS.items() if entry.lmms_eval_task}
    with pytest.raises(ValueError, match="Unknown evaluation dataset 'object-4x4'; available: easy-vqa, mosaic-2x2"):
        evaluation_dataset("object-4x4")


def test_the_cli_offers_the_registrys_datasets(capsys):
    from leo_mini_hf.cli import main
    from leo_mini_hf.easyvqa.registry import EVALUATION_DATASETS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = capsys.readouterr().out
    for name in EVALUATION_DATASETS:
        assert name in help_text
