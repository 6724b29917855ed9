"""`leo-mini export` and `leo-mini push`: verified Hub folders, model card, and failure that loses nothing."""

import hashlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from leo_mini_hf.cli import main as cli
from leo_mini_hf.hub import export as export_module
from leo_mini_hf.hub.export import export_checkpoint, read_safetensors_folder
from leo_mini_hf.hub.push import PushError, push_folder


def folder_digest(folder) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def eval_result(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "easy-vqa.json"
    cli(["eval", "--model", str(tiny_checkpoint), "--limit", "6", "--output", str(path)])
    return path


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, eval_result, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "leo-mini-tiny"
    cli(["export", "--model", str(tiny_checkpoint), "--out", str(out), "--max-shard-size", "300KB",
         "--repo-id", "acme/leo-mini-tiny", "--base-model", "acme/tiny-llm", "--dataset", "easy-vqa",
         "--eval-results", str(eval_result)])
    return out


@pytest.mark.slow
def test_export_is_sharded_complete_and_bit_identical(tiny_checkpoint, exported):
    names = {p.name for p in exported.iterdir()}
    assert "model.safetensors.index.json" in names and len(list(exported.glob("model-*.safetensors"))) > 1
    for required in ("config.json", "generation_config.json", "processor_config.json", "tokenizer.json",
                     "chat_template.jinja", "README.md", "modeling_leo_mini.py", "processing_leo_mini.py"):
        assert required in names, required
    assert "auto_map" in json.loads((exported / "config.json").read_text())
    source, output = read_safetensors_folder(tiny_checkpoint), read_safetensors_folder(exported)
    assert source.keys() == output.keys()
    assert all(torch.equal(source[k], output[k]) and source[k].dtype == output[k].dtype for k in source)


@pytest.mark.slow
def test_model_card_metadata_and_numbers(exported, eval_result):
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")
    data = card.data
    assert (data.library_name, data.pipeline_tag, data.license) == ("transformers", "image-text-to-text", "apache-2.0")
    assert "custom_code" in data.tags and data.base_model == ["acme/tiny-llm"] and data.datasets == ["easy-vqa"]
    evaluated = json.loads(eval_result.read_text())
    [result] = data.eval_results  # the model-index, from `leo-mini eval --output`
    assert (result.dataset_type, result.dataset_split, result.metric_type) == ("easy-vqa", "test", "accuracy")
    assert result.metric_value == evaluated["accuracy"] and evaluated["count"] == 6
    text = card.text
    assert 'from_pretrained("acme/leo-mini-tiny", trust_remote_code=True)' in text
    assert "Per image, 20 visual tokens from the experts become **4** tokens" in text
    assert "| CLIPVisionModel | 32 px | 16 x 32 |" in text and "| easy-vqa | test | 6 |" in text
    assert "trained on easy-vqa only" in text and "@inproceedings{wang2025leomini," in text
    assert "## Efficiency" in text  # a CoTR model: the paper-scale numbers apply
    assert "{{" not in text and "{%" not in text
    total = int(text.split("| total | ")[1].split(" |")[0].replace(",", ""))
    assert total == sum(t.numel() for t in read_safetensors_folder(exported).values())


def test_model_card_facts_come_from_the_builder(tmp_path):
    """A part loaded from the Hugging Face cache names its Hub id as base_model; another reduction than CoTR gets no
    paper-scale efficiency section; the card of a folder passes its facts on to an export."""
    from huggingface_hub import ModelCard

    from helpers.tiny_models import tiny_model
    from leo_mini_hf.hub.model_card import card_facts, hub_model_id, write_model_card

    cached = tmp_path / "hub" / "models--acme--tiny-llm" / "snapshots" / "0123abc"
    assert hub_model_id(cached) == "acme/tiny-llm" and hub_model_id(tmp_path / "plain-folder") is None
    write_model_card(tiny_model(token_reduction="avg_pool"), tmp_path, base_models=[hub_model_id(cached)])
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == ["acme/tiny-llm"] and "## Efficiency" not in card.text
    assert "trained on easy-vqa only" not in card.text  # no datasets named
    assert card_facts(tmp_path) == {"base_models": ["acme/tiny-llm"], "datasets": []}
    assert card_facts(tmp_path / "no-card") == {"base_models": [], "datasets": []}


def test_eval_results_must_be_leo_mini_eval_output(tmp_path):
    from leo_mini_hf.hub.model_card import eval_results_from

    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(ValueError, match="not a result file written by `leo-mini eval --output`"):
        eval_results_from([tmp_path / "other.json"])
    control = {"dataset": "easy-vqa", "split": "test", "accuracy": 0.3, "count": 6, "swap_images": True}
    (tmp_path / "control.json").write_text(json.dumps(control))
    with pytest.raises(ValueError, match="is a --swap-images control"):
        eval_results_from([tmp_path / "control.json"])


@pytest.mark.slow
def test_export_casts_only_when_asked(tiny_checkpoint, tmp_path, capsys):
    out = export_checkpoint(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16")
    assert "verifying the export: logits with leo_mini_hf: 100%" in capsys.readouterr().err  # a progress bar
    tensors = read_safetensors_folder(out)
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="--dtype"):
        export_checkpoint(tiny_checkpoint, tmp_path / "bad", dtype="int8")


def test_failed_export_leaves_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def broken_verify(*args, **kwargs):
        raise ValueError("Export changed tensor x")

    monkeypatch.setattr(export_module, "verify_export", broken_verify)
    with pytest.raises(ValueError, match="changed tensor"):
        export_checkpoint(tiny_checkpoint, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_export_never_overwrites(tiny_checkpoint, exported):
    before = folder_digest(exported)
    with pytest.raises(SystemExit):
        cli(["export", "--model", str(tiny_checkpoint), "--out", str(exported)])
    assert folder_digest(exported) == before


@pytest.mark.slow
def test_verification_catches_a_changed_tensor(tiny_checkpoint, exported):
    source = read_safetensors_folder(tiny_checkpoint)
    key = next(iter(source))
    source[key] = source[key] + 1
    with pytest.raises(ValueError, match=f"Export changed tensor {key}"):
        export_module.verify_export(source, exported, dtype=None)


@pytest.mark.slow
def test_push_without_token_fails_clearly(exported, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setattr("leo_mini_hf.hub.push.get_token", lambda: None)
    before = folder_digest(exported)
    with pytest.raises(PushError, match="No Hugging Face token"):
        push_folder(exported, "acme/leo-mini-tiny")
    assert folder_digest(exported) == before


@pytest.mark.slow
def test_push_to_unreachable_endpoint_fails_clearly(exported, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    before = folder_digest(exported)
    with pytest.raises(SystemExit, match=r"failed: .*127\.0\.0\.1:9|127\.0\.0\.1:9.*failed"):
        cli(["push", "--folder", str(exported), "--repo-id", "acme/leo-mini-tiny"])
    assert folder_digest(exported) == before


def test_push_refuses_a_non_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        push_folder(tmp_path, "acme/x")


# ---- folders: permissions, leftovers of killed runs, races, orphans -------------------------------------------------

def test_written_folders_get_the_users_normal_permissions(tmp_path):
    from leo_mini_hf.folders import write_folder_atomically

    umask = os.umask(0o022)
    try:
        fresh = write_folder_atomically(tmp_path / "fresh", lambda folder: (folder / "f.txt").write_text("x"))
        existing = tmp_path / "existing"
        existing.mkdir(mode=0o750)
        os.chmod(existing, 0o750)
        write_folder_atomically(existing, lambda folder: (folder / "f.txt").write_text("x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o755  # as mkdir / save_pretrained would make it, not 0700
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750  # the empty folder it replaced keeps its mode
    assert not (fresh / ".leo-mini-partial").exists()


@pytest.mark.slow
def test_partial_folders_of_killed_runs_are_swept_and_nothing_else(tmp_path):
    from leo_mini_hf.folders import PARTIAL_MARKER, write_folder_atomically

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    host = socket.gethostname()

    def partial(name, pid, marker=True, marker_host=host):
        folder = tmp_path / f".{name}.partial.{pid}.abc123"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
        if marker:
            (folder / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": marker_host}))
        return folder

    stale = partial("old-run", dead_pid)
    running = partial("running", os.getpid())
    unmarked = partial("someone-elses", dead_pid, marker=False)
    other_host = partial("other-host", dead_pid, marker_host="another-machine")
    user_folder = tmp_path / "results.partial.notes"
    user_folder.mkdir()
    write_folder_atomically(tmp_path / "new", lambda folder: (folder / "f.txt").write_text("x"))
    assert not stale.exists()
    assert running.exists() and unmarked.exists() and other_host.exists() and user_folder.exists()


def test_a_folder_that_appears_while_writing_is_not_overwritten(tmp_path, capsys):
    from leo_mini_hf.folders import write_folder_atomically

    out = tmp_path / "out"

    def write_while_another_run_finishes(folder):
        (folder / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(FileExistsError, match="appeared while it was being written"):
        write_folder_atomically(out, write_while_another_run_finishes)
    assert [path.name for path in out.iterdir()] == ["theirs.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


def test_export_of_a_missing_folder_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["export", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert f"The model folder not found: {tmp_path / 'absent'}" in capsys.readouterr().err


def _children(pid: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            children.append(int(stat_file.parent.name))
    return children


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.slow
def test_export_verification_child_dies_with_its_parent(tiny_checkpoint, tmp_path):
    parent = subprocess.Popen([sys.executable, "-m", "leo_mini_hf.cli", "export", "--model", str(tiny_checkpoint),
                               "--out", str(tmp_path / "out")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    children = []
    while not children and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.05)
        children = _children(parent.pid)
    assert children, "the export finished or failed before its verification child started"
    parent.kill()
    parent.wait()
    killed = time.monotonic()
    while any(_running(child) for child in children) and time.monotonic() < killed + 10:
        time.sleep(0.05)
    # well before the child would have finished its own work (importing torch and transformers, loading the model)
    assert time.monotonic() - killed < 1.5 and not any(_running(child) for child in children)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_export_of_the_trained_demo_checkpoint_verifies(tmp_path, dtype):
    """LEO-MINI-Smol: trained CoTR, projector and MMoE weights, an LLM config that carries its own float32. Its
    half-precision export failed its own check ("computes different logits", up to 0.375): the reference was the
    model cast in memory, whose rotary frequencies were cast too. The check now loads like with like."""
    from leo_mini_hf.demo import demo_checkpoint

    out = export_checkpoint(demo_checkpoint(), tmp_path / dtype, dtype=dtype)
    tensors = read_safetensors_folder(out)
    assert {tensor.dtype for tensor in tensors.values() if tensor.is_floating_point()} == {getattr(torch, dtype)}
    card = (out / "README.md").read_text()  # what the demo's builder knew reaches the export's card
    assert "base_model:\n- HuggingFaceTB/SmolLM2-135M-Instruct" in card and "datasets:\n- easy-vqa" in card
    assert "trained on easy-vqa only" in card
