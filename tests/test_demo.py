"""Shipped adapter weights (save / checksum / load) and `leo-mini eval`, on the tiny model."""

import json

import pytest
import torch

from helpers.tiny_models import tiny_model
from leo_mini_hf.cli import main as cli
from leo_mini_hf.demo import bundled_questions
from leo_mini_hf.training.adapter_weights import load_adapter_weights, save_adapter_weights, trained_parameter_names


def test_adapter_weights_round_trip_with_checksum(tmp_path):
    trained, fresh = tiny_model(seed=1), tiny_model(seed=2)
    path = tmp_path / "adapter.safetensors"
    save_adapter_weights(trained, path, metadata={"config": "{}"})
    load_adapter_weights(fresh, path)
    trained_names = trained_parameter_names(fresh)
    for name, tensor in fresh.state_dict().items():
        if name in trained_names:
            torch.testing.assert_close(tensor, trained.state_dict()[name].half().float(), rtol=0, atol=0)
    assert trained_names and "model.language_model.embed_tokens.weight" not in trained_names
    assert not torch.equal(fresh.model.language_model.embed_tokens.weight, trained.model.language_model.embed_tokens.weight)


def test_corrupt_or_mismatched_adapter_weights_raise(tmp_path):
    model = tiny_model()
    path = tmp_path / "adapter.safetensors"
    save_adapter_weights(model, path, metadata={"config": "{}"})
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        load_adapter_weights(model, path)
    save_adapter_weights(tiny_model(mmoe_num_experts=0), path, metadata={"config": "{}"})
    with pytest.raises(ValueError, match="does not fit the model"):
        load_adapter_weights(model, path)


def test_bundled_questions_exist():
    questions = bundled_questions()
    assert len(questions) == 6
    assert {q["answer"] for q in questions} <= {"circle", "rectangle", "triangle", "yes", "no", "red", "green", "blue",
                                                "black", "gray", "teal", "brown", "yellow"}


def test_eval_command(tiny_checkpoint, capsys):
    pytest.importorskip("easy_vqa")
    cli(["eval", "--model", str(tiny_checkpoint), "--split", "test", "--limit", "6", "--batch-size", "3"])
    captured = capsys.readouterr()
    printed = captured.out
    result = json.loads(printed[: printed.index("\n|")])
    assert result["count"] == 6 and 0.0 <= result["accuracy"] <= 1.0
    assert "| all |" in printed
    assert "answering: 100%" in captured.err and "6/6" in captured.err  # the progress bar, on stderr


def test_eval_command_on_mosaics_with_swapped_images(tiny_checkpoint, capsys):
    cli(["eval", "--model", str(tiny_checkpoint), "--dataset", "mosaic-3x3", "--limit", "4", "--batch-size", "4",
         "--swap-images"])
    printed = capsys.readouterr().out
    result = json.loads(printed[: printed.index("\n|")])
    assert result["count"] == 4
    assert sorted(result["count_per_type"]) == ["mosaic colour at cell", "mosaic count", "mosaic shape at cell",
                                                "mosaic where"]


@pytest.mark.parametrize("dataset", ["object-2x2", "object-distinct-3x3"])
def test_eval_command_on_object_named_mosaics(tiny_checkpoint, capsys, dataset):
    cli(["eval", "--model", str(tiny_checkpoint), "--dataset", dataset, "--limit", "6", "--batch-size", "6"])
    printed = capsys.readouterr().out
    result = json.loads(printed[: printed.index("\n|")])
    assert result["count_per_type"] == {"object colour and shape": 2, "object colour of shape": 2,
                                        "object shape of colour": 2}


def test_eval_refuses_an_empty_sample_and_a_missing_model(tiny_checkpoint, capsys):
    with pytest.raises(SystemExit):
        cli(["eval", "--model", str(tiny_checkpoint), "--limit", "0"])
    assert "--limit must be a positive number of questions" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["eval", "--model", "/no/such/model"])
    assert "The model folder not found: /no/such/model" in capsys.readouterr().err


def test_demo_on_another_checkpoint_describes_that_checkpoint(tiny_checkpoint, capsys):
    cli(["demo", "--model", str(tiny_checkpoint), "--max-new-tokens", "2"])
    printed = capsys.readouterr().out
    assert f"LEO-MINI checkpoint {tiny_checkpoint}: llama LLM + CLIPVisionModel, ConvNextModel" in printed
    assert "LEO-MINI-Smol" not in printed and "trained on easy-vqa" not in printed
    assert "20 from the experts -> 4 after CoTR" in printed


def test_the_demo_cache_never_deletes_what_the_package_did_not_write(tmp_path, monkeypatch):
    """A folder at the demo checkpoint's cache path without our marker (a user's files) is refused, not deleted; one
    with an outdated marker (an older build of ours) is rebuilt."""
    from leo_mini_hf import demo

    monkeypatch.setenv("LEO_MINI_CACHE", str(tmp_path))
    folder = tmp_path / "leo-mini-smol-easyvqa"
    folder.mkdir()
    (folder / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files leo-mini-hf did not write"):
        demo.demo_checkpoint()
    assert (folder / "precious.txt").read_text() == "mine"

    (folder / "precious.txt").unlink()
    (folder / "adapter.sha256").write_text("an older build")
    built = []
    monkeypatch.setattr(demo, "build_demo_checkpoint", lambda path, progress=None: built.append(path) or path)
    assert demo.demo_checkpoint() == folder and built == [folder] and not folder.exists()


@pytest.mark.slow
def test_a_demo_killed_while_converting_leaves_a_cache_the_next_demo_uses(tmp_path):
    """Killed while the LLM part was being written, the first demo left `parts/llm/` with config.json and a temporary
    file, and every later demo failed. Parts are now written atomically: the next demo converts again and answers.
    A part an older version left half-written in place is replaced too."""
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "LEO_MINI_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "leo_mini_hf.cli", "demo"]
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and first.poll() is None:
        staging = list((tmp_path / "parts").glob(".llm.partial.*")) if (tmp_path / "parts").is_dir() else []
        if staging and (staging[0] / "config.json").exists():  # the LLM's save has begun
            break
        time.sleep(0.05)
    assert first.poll() is None, "the demo ended before the LLM part was being written"
    first.kill()
    first.wait()
    assert not (tmp_path / "parts" / "llm").exists()
    legacy = tmp_path / "parts" / "mobilenet_v2"  # as an older version left it: written in place, cut short
    legacy.mkdir()
    (legacy / "config.json").write_text("{}")
    (legacy / "tmpk2j4x9.safetensors").write_bytes(b"cut")
    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "6/6 bundled questions answered correctly" in second.stdout
    assert "[transformers]" not in second.stderr  # a fresh assembly prints no transformers warning
    assert sorted(path.name for path in (tmp_path / "parts").iterdir()) == [".lock", "llm", "mobilenet_v2"]
