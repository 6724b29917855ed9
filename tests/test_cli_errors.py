"""Bad command-line input gets one line naming what is wrong (exit 2), never a traceback, a crash or a server that
fails every request."""

import subprocess
import sys

import pytest

from leo_mini_hf.cli import main as cli


def refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit:
        cli(list(argv))
    assert exit.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"leo-mini {argv[0]}: "), error
    return error[0]


@pytest.mark.parametrize("setting, message", [
    ("vision_experts=[]", "vision_experts is empty: LEO-MINI needs at least one vision expert"),
    ("num_visual_tokens=100000000", r"100000000 tokens per image: one image would not fit the LLM's 512 positions"),
])
def test_build_refuses_settings_that_cannot_make_a_model(tmp_path, capsys, setting, message):
    import re

    assert re.search(message, refused(capsys, "build", "--preset", "tiny", "--random-init", "--out",
                                      str(tmp_path / "out"), "--set", setting))
    assert not (tmp_path / "out").exists()


def test_convert_llava_names_a_folder_that_is_not_llava(tmp_path, capsys):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text('{"model_type": "llama"}')
    message = refused(capsys, "convert", "llava", "--src", str(tmp_path / "llm"), "--out", str(tmp_path / "out"))
    assert "is not a LLaVA checkpoint: its config.json has model_type 'llama'" in message
    (tmp_path / "empty").mkdir()
    message = refused(capsys, "convert", "llava", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "out"))
    assert "is not a transformers checkpoint folder (no readable config.json" in message


@pytest.mark.parametrize("options, message", [
    (["--port", "99999"], "--port must be between 1 and 65535, got 99999"),
    (["--host", "999.1.1.1"], "--host '999.1.1.1' is not an address this machine can listen on"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
])
def test_serve_refuses_options_before_loading_anything(capsys, options, message):
    """Checked first: the model folder given does not even exist, and nothing is loaded or started."""
    assert message in refused(capsys, "serve", "--model", "/nonexistent", *options)


@pytest.mark.slow
def test_a_disk_that_fills_up_during_build_gives_one_line_and_no_folder(tmp_path):
    """A real write failure: the process may write files of at most 200 kB (RLIMIT_FSIZE), so the weights' write
    fails inside safetensors as on a full disk."""
    program = ("import resource, signal, sys\n"
               "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
               "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
               "from leo_mini_hf.cli import main\n"
               "main(sys.argv[1:])\n")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", program, "build", "--preset", "tiny", "--random-init", "--out",
                             str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "leo-mini build: writing the weights failed: " in result.stderr and "File too large" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
