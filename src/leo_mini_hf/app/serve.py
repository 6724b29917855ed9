"""`leo-mini serve` and `leo-mini space`: the web demo on this machine, and a folder that runs as a Hugging Face
Space (Gradio SDK) with the same app."""

import json
import shutil
import socket
from pathlib import Path

APP_MODULE = Path(__file__).with_name("leo_mini_app.py")
DEMO_EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "demo"
INSTALL_HINT = "pip install 'leo-mini-hf[app]'"


def import_app():
    """The app module, or a clear error saying how to install Gradio."""
    try:
        from . import leo_mini_app
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "gradio":
            raise ValueError(f"the web demo needs Gradio: {INSTALL_HINT}") from error
        raise
    return leo_mini_app


def check_serve_options(host: str, port: int, max_new_tokens: int) -> None:
    """Refuse, before the model loads, what would make the server fail at start or on every request."""
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be between 1 and 65535, got {port}")
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)  # port 0: checks the address only; Gradio reports a busy port itself
    except OSError as error:
        raise ValueError(f"--host {host!r} is not an address this machine can listen on: {error}") from None


def serve(model_dir: str | None, host: str, port: int, max_new_tokens: int) -> None:
    """Start the app on LEO-MINI-Smol (assembled offline, as `leo-mini demo` does) or on a checkpoint folder."""
    check_serve_options(host, port, max_new_tokens)
    app_module = import_app()
    from ..demo import demo_checkpoint
    from ..folders import require_path

    folder = require_path(model_dir, "The model") if model_dir else demo_checkpoint()
    chat = app_module.LeoMiniChat(*app_module.load_model(str(folder)), max_new_tokens=max_new_tokens)
    app = app_module.build_app(chat, app_module.bundled_examples(DEMO_EXAMPLES))
    print(f"LEO-MINI demo on http://{host}:{port} (model: {folder}); Ctrl+C stops it", flush=True)
    app_module.launch(app, host=host, port=port, allowed_paths=[DEMO_EXAMPLES])


def requirements() -> str:
    """requirements.txt for the Space: the versions this package is tested with, pinned."""
    from importlib.metadata import version

    pins = [f"{name}=={version(name)}" for name in ("torch", "transformers", "gradio", "numpy", "pillow",
                                                     "safetensors", "accelerate")]
    return "\n".join(pin.replace("+cpu", "") for pin in pins) + "\n"


def space_readme(model: str, gradio_version: str) -> str:
    return f"""---
title: LEO-MINI
emoji: 🦁
colorFrom: yellow
colorTo: red
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
---

# LEO-MINI demo

Ask about an image; the answer streams in, with the visual tokens before and after conditional token reduction, the
time to the first token and to the answer, and a heat map of where the reduction looked. Model: `{model}`.
Written by `leo-mini space` (leo-mini-hf); the app is `leo_mini_app.py`, the model loads with its remote code.
"""


def write_space(out, model: str) -> Path:
    """Write a Space folder: app.py, leo_mini_app.py, requirements.txt, README.md (Space metadata), examples/.
    `model` is a Hub repo id or a local checkpoint folder (made absolute)."""
    from importlib.metadata import version

    from ..folders import write_folder_atomically

    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} is not a checkpoint folder (no config.json)")
        model = str(local.resolve())
    elif model.count("/") != 1 or model.startswith(("/", ".")) or model.endswith("/"):
        raise ValueError(f"--model must be a local checkpoint folder or a Hub repo id (ORG/NAME), got {model!r}")

    def write(folder: Path) -> None:
        shutil.copyfile(APP_MODULE, folder / "leo_mini_app.py")
        (folder / "app.py").write_text('"""LEO-MINI demo Space, written by `leo-mini space`."""\n\n'
                                       "from leo_mini_app import main\n\n"
                                       f"main({model!r}, examples_dir='examples')\n")
        (folder / "requirements.txt").write_text(requirements())
        (folder / "README.md").write_text(space_readme(model, version("gradio")))
        examples = folder / "examples"
        examples.mkdir()
        questions = json.loads((DEMO_EXAMPLES / "questions.json").read_text())
        for item in questions:
            shutil.copyfile(DEMO_EXAMPLES / item["image"], examples / item["image"])
        (examples / "questions.json").write_text(json.dumps(questions, indent=2) + "\n")

    return write_folder_atomically(out, write)

