"""lmms-eval integration: the `leo_mini` model (entry point, generate_until, loglikelihood) and the local easy-vqa tasks,
run offline through lmms-eval's own evaluator and command line."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test` (pip install --no-deps lmms-eval)")

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from leo_mini_hf.easyvqa.dataset import EasyVQADataset  # noqa: E402
from leo_mini_hf.easyvqa.evaluation import answer_questions, evaluate_vqa  # noqa: E402
from leo_mini_hf.easyvqa.object_named import DistinctObjectMosaicDataset, ObjectNamedMosaicDataset  # noqa: E402
from leo_mini_hf.lmms.model import LeoMiniLmms, _cut_at  # noqa: E402
from leo_mini_hf.lmms import TASKS_DIR  # noqa: E402
from leo_mini_hf.lmms.tasks import doc_to_visual, easy_vqa_documents  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def leo_mini_lmms(tiny_checkpoint):
    return LeoMiniLmms(pretrained=str(tiny_checkpoint), batch_size=3)


def evaluate(checkpoint, tasks: list[str], limit: int, batch_size: int = 4) -> dict:
    return simple_evaluate(model="leo_mini", model_args=f"pretrained={checkpoint}", tasks=tasks, limit=limit,
                           batch_size=batch_size, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                           log_samples=True)


def request(*args):
    return SimpleNamespace(args=args)


def test_the_entry_point_resolves_to_the_model_class():
    assert get_model("leo_mini") is LeoMiniLmms
    assert get_model("leo-mini") is LeoMiniLmms


@pytest.mark.parametrize("task, dataset", [
    ("easy_vqa", lambda n: EasyVQADataset("test", limit=n)),
    ("easy_vqa_object_2x2", lambda n: ObjectNamedMosaicDataset("test", 2, size=n, seed=0)),
    ("easy_vqa_object_distinct_3x3", lambda n: DistinctObjectMosaicDataset("test", 3, size=n, seed=0)),
])
@pytest.mark.slow
def test_simple_evaluate_scores_a_local_task_as_leo_mini_eval_answers_it(tiny_checkpoint, task, dataset):
    """Offline, with a limit: lmms-eval's answers are exactly `leo-mini eval`'s greedy answers to the same first N
    questions (same prompt, same image), and its score is their exact-match rate."""
    limit = 6
    out = evaluate(tiny_checkpoint, [task], limit)
    samples = sorted(out["samples"][task], key=lambda sample: sample["doc_id"])
    assert len(samples) == limit
    from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor

    model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = LeoMiniProcessor.from_pretrained(tiny_checkpoint)
    questions = dataset(limit)
    expected = answer_questions(model, processor, [questions[i] for i in range(limit)], batch_size=limit)
    assert [sample["resps"][0][0] for sample in samples] == [_cut_at(answer, ["\n"]) for answer in expected]
    score = out["results"][task]["exact_match,none"]
    assert score == evaluate_vqa(model, processor, questions, batch_size=limit)["accuracy"]


def test_loglikelihood_is_the_continuations_log_probability_from_the_logits(leo_mini_lmms, tiny_checkpoint):
    from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor

    model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = LeoMiniProcessor.from_pretrained(tiny_checkpoint)
    documents = easy_vqa_documents("easy-vqa", "test")[:3]
    leo_mini_lmms.task_dict = {"easy": {"test": documents}}

    def prompt_ids(doc_id):
        conversation = [{"role": "user", "content": [{"type": "image", "image": doc_to_visual(documents[doc_id])[0]},
                                                     {"type": "text", "text": documents[doc_id]["question"]}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                             return_dict=True, return_tensors="pt")

    def by_hand(doc_id, target_ids):
        inputs = prompt_ids(doc_id)
        prompt_length = inputs["input_ids"].shape[1]
        input_ids = torch.cat([inputs["input_ids"], target_ids[None]], dim=1)
        labels = torch.full_like(input_ids, -100)
        labels[0, prompt_length:] = target_ids
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                           pixel_values=inputs["pixel_values"], labels=labels).logits[0]
        log_probs = F.log_softmax(logits[prompt_length - 1:-1].float(), dim=-1)
        return log_probs[torch.arange(len(target_ids)), target_ids].sum().item()

    # the model's own greedy continuation (3 tokens, so a multi-token target) is greedy; a changed one is not
    inputs = prompt_ids(0)
    greedy_ids = model.generate(**inputs, max_new_tokens=3, do_sample=False, min_new_tokens=3)[0, -3:]
    greedy_text = processor.tokenizer.decode(greedy_ids)
    if processor.tokenizer(greedy_text, add_special_tokens=False)["input_ids"] != greedy_ids.tolist():
        pytest.skip("the tiny tokenizer does not round-trip this greedy continuation")
    other_ids = processor.tokenizer(" red", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    other_text = " red" if not torch.equal(other_ids, greedy_ids[: len(other_ids)]) else " blue"
    other_ids = processor.tokenizer(other_text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    requests = [request(documents[0]["question"], greedy_text, doc_to_visual, 0, "easy", "test"),
                request(documents[0]["question"], other_text, doc_to_visual, 0, "easy", "test"),
                request(documents[2]["question"], lambda doc: " " + doc["answer"], doc_to_visual, 2, "easy", "test")]
    results = leo_mini_lmms.loglikelihood(requests)  # one batch of 3, right-padded
    answer_ids = processor.tokenizer(" " + documents[2]["answer"], add_special_tokens=False,
                                     return_tensors="pt")["input_ids"][0]
    expected = [by_hand(0, greedy_ids), by_hand(0, other_ids), by_hand(2, answer_ids)]
    assert [value for value, _ in results] == pytest.approx(expected, abs=1e-4)
    assert results[0][1] is True and results[1][1] is False
    assert len(greedy_ids) == 3 and all(value < 0 for value in expected)


def test_generate_until_batches_cut_at_stop_strings_and_match_one_at_a_time(leo_mini_lmms, capsys):
    documents = easy_vqa_documents("object-2x2", "test", size=5)
    leo_mini_lmms.task_dict = {"object": {"test": documents}}
    options = {"max_new_tokens": 6, "temperature": 0, "do_sample": False}
    requests = [request(doc["question"], dict(options), doc_to_visual, i, "object", "test")
                for i, doc in enumerate(documents)]
    batched = leo_mini_lmms.generate_until(requests)  # batch_size 3: a batch of 3 and one of 2, left-padded
    progress = capsys.readouterr().err  # lmms-eval's own models show this bar
    assert "Model Responding: 100%" in progress and "5/5" in progress
    one_at_a_time = [leo_mini_lmms.generate_until([r])[0] for r in requests]
    assert batched == one_at_a_time and len(batched) == 5
    full = leo_mini_lmms.generate_until([request(documents[0]["question"], dict(options), doc_to_visual, 0, "object",
                                                 "test")])[0]
    if len(full) > 1:
        stop = full[1]
        cut = leo_mini_lmms.generate_until([request(documents[0]["question"], {**options, "until": [stop]},
                                                    doc_to_visual, 0, "object", "test")])[0]
        assert cut == full[: full.index(stop)]


def test_cut_at_the_first_stop_string():
    assert _cut_at("red.\nblue", ["\n", "."]) == "red"
    assert _cut_at("red", ["\n"]) == "red" and _cut_at("red", []) == "red"


def test_bad_arguments_and_non_image_visuals_are_refused(tiny_checkpoint, leo_mini_lmms):
    with pytest.raises(ValueError, match="unknown model_args \\['temprature'\\]"):
        LeoMiniLmms(pretrained=str(tiny_checkpoint), temprature=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        LeoMiniLmms(pretrained=str(tiny_checkpoint), batch_size="0")
    with pytest.raises(ValueError, match="dtype must be one of"):
        LeoMiniLmms(pretrained=str(tiny_checkpoint), dtype="fp8")
    leo_mini_lmms.task_dict = {"video": {"test": [{"video": "clip.mp4"}]}}
    with pytest.raises(ValueError, match="takes images only"):
        leo_mini_lmms.generate_until([request("what happens?", {}, lambda doc: [doc["video"]], 0, "video", "test")])
    with pytest.raises(NotImplementedError, match="single-round"):
        leo_mini_lmms.generate_until_multi_round([])


def readme_lmms_eval_command() -> str:
    """The README's offline lmms-eval command, joined from its continuation lines."""
    lines = (Path(__file__).parents[1] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "lmms-eval --model leo_mini" in line and "OFFLINE" in line)
    command = lines[start]
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + lines[start]
    return command


@pytest.mark.slow
def test_the_readme_lmms_eval_command_runs(tiny_checkpoint, tmp_path):
    """The README's command as written (`batch_size` in --model_args clashed with lmms-eval's own --batch_size), on
    the tiny checkpoint, limited to 3 questions."""
    command = readme_lmms_eval_command().replace("pretrained=DIR", f"pretrained={tiny_checkpoint}")
    assert "batch_size=16" in command and "$(python -m leo_mini_hf.lmms)" in command
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # this venv's lmms-eval and python
    done = subprocess.run(["bash", "-c", command + " --limit 3"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PATH": path})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    table_row = next(line for line in done.stdout.splitlines() if line.startswith("|easy_vqa"))
    assert "exact_match" in table_row


def test_model_args_batch_size_wins_over_the_command_lines_default(tiny_checkpoint):
    model = LeoMiniLmms.create_from_arg_string(f"pretrained={tiny_checkpoint},batch_size=16",
                                               {"batch_size": 1, "max_batch_size": None, "device": None})
    assert model.batch_size == 16
    assert LeoMiniLmms.create_from_arg_string(f"pretrained={tiny_checkpoint}", {"batch_size": 2}).batch_size == 2


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(ValueError, match="leo_mini: pretrained folder not found: /nonexistent"):
        LeoMiniLmms(pretrained="/nonexistent")
    with pytest.raises(ValueError, match="pretrained folder not found"):
        LeoMiniLmms(pretrained=str(tmp_path / "not" / "here"))


@pytest.mark.parametrize("options, match", [
    ({"num_beams": 0}, r"num_beams must be a positive integer, got 0"),
    ({"max_new_tokens": "five"}, r"max_new_tokens must be a positive integer, got 'five'"),
    ({"temperature": -1}, r"temperature must be a number in \[0, inf\), got -1"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"until": [5]}, "until must be a string or a list of strings"),
])
def test_bad_generation_options_are_named(leo_mini_lmms, options, match):
    with pytest.raises(ValueError, match=match):
        leo_mini_lmms._generation_options(options)


def test_numeric_strings_and_empty_stop_strings_are_read_as_meant(leo_mini_lmms):
    """YAML's max_new_tokens: "5" is 5 tokens; until: [""] does not stop after the first token."""
    documents = easy_vqa_documents("object-2x2", "test", size=2)
    leo_mini_lmms.task_dict = {"object": {"test": documents}}

    def answer(options):
        return leo_mini_lmms.generate_until([request(documents[0]["question"], options, doc_to_visual, 0, "object",
                                                     "test")])[0]
    plain = answer({"max_new_tokens": 5})
    assert answer({"max_new_tokens": "5"}) == plain
    assert answer({"max_new_tokens": 5, "until": [""]}) == plain
    assert leo_mini_lmms._generation_options({"until": ["", "\n"]})[1] == ["\n"]


def test_a_context_longer_than_the_models_positions_is_refused(leo_mini_lmms):
    positions = leo_mini_lmms.model.config.text_config.max_position_embeddings
    leo_mini_lmms.task_dict = {"long": {"test": easy_vqa_documents("object-2x2", "test", size=1)}}
    context = "red " * positions
    long_request = request(context, {"max_new_tokens": 2}, doc_to_visual, 0, "long", "test")
    with pytest.raises(ValueError, match=rf"task 'long' \(test, doc 0\): the prompt \+ max_new_tokens take \d+ "
                                         rf"tokens, more than the model's {positions} positions"):
        leo_mini_lmms.generate_until([long_request])
    loglikelihood_request = request(context, " red", doc_to_visual, 0, "long", "test")
    with pytest.raises(ValueError, match="the context \\+ continuation take"):
        leo_mini_lmms.loglikelihood([loglikelihood_request])


@pytest.mark.slow
def test_tasks_folder_is_printed_for_include_path():
    done = subprocess.run([sys.executable, "-m", "leo_mini_hf.lmms"], capture_output=True, text=True)
    assert done.stdout.strip() == str(TASKS_DIR)
    assert {path.name for path in TASKS_DIR.glob("*.yaml")} == {
        "easy_vqa.yaml", "easy_vqa_object_2x2.yaml", "easy_vqa_object_3x3.yaml", "easy_vqa_object_distinct_2x2.yaml",
        "easy_vqa_object_distinct_3x3.yaml"}


@pytest.mark.slow
def test_on_leo_mini_smol_lmms_eval_and_leo_mini_eval_agree_exactly():
    """The trained demo model: lmms-eval's score on the first N easy-vqa test questions is `leo-mini eval`'s
    accuracy on the same N questions."""
    from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
    from leo_mini_hf.demo import demo_checkpoint

    folder = demo_checkpoint()
    limit = 48
    out = evaluate(folder, ["easy_vqa"], limit, batch_size=16)
    model = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    processor = LeoMiniProcessor.from_pretrained(folder)
    ours = evaluate_vqa(model, processor, EasyVQADataset("test", limit=limit), batch_size=16)
    assert len(out["samples"]["easy_vqa"]) == ours["count"] == limit
    assert out["results"]["easy_vqa"]["exact_match,none"] == ours["accuracy"] > 0.5
