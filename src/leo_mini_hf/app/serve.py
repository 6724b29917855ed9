"""`leo-mini serve` and `leo-mini space`: the web demo on this machine, and a folder that runs as a Hugging Face
Space (Gradio SDK) with the same app."""

import json
import shutil
import socket
from importlib.metadata import PackageNotFoundError, version
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


# PyTorch's CPU wheels (a Space without a GPU): PyPI's Linux torch pulls several GB of CUDA libraries
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
BUNDLED_MODEL = "model"  # the checkpoint's folder inside a Space written with bundle=True


def installed_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        raise ValueError(f"the Space pins the installed {package}, which is missing: {INSTALL_HINT}") from None


def requirements() -> str:
    """requirements.txt for the Space: the versions this package is tested with, pinned; torch's CPU build, from
    PyTorch's CPU index as PyTorch documents."""
    torch_version = installed_version("torch").split("+")[0]
    pins = [f"{name}=={installed_version(name)}" for name in ("transformers", "gradio", "numpy", "pillow",
                                                               "safetensors", "accelerate")]
    return "\n".join([f"--extra-index-url {TORCH_CPU_INDEX}", f"torch=={torch_version}+cpu", *pins]) + "\n"


def space_readme(model: str, gradio_version: str, hub_model: bool) -> str:
    """README.md with the Space's metadata: the model (a Hub repo id) is listed under `models:` so the Hub links
    them; a bundled checkpoint is described in the text."""
    models = f"models:\n  - {model}\n" if hub_model else ""
    source = f"`{model}`" if hub_model else "the checkpoint bundled in `model/`"
    return f"""---
title: LEO-MINI
emoji: 🦁
colorFrom: yellow
colorTo: red
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
short_description: Ask about an image; see where LEO-MINI's token reduction looked
{models}---

# LEO-MINI demo

Ask about an image; the answer streams in, with the visual tokens before and after conditional token reduction, the
time to the first token and to the answer, and a heat map of where the reduction looked. Model: {source}.
Written by `leo-mini space` (leo-mini-hf); the app is `leo_mini_app.py`, the model loads with its remote code.
"""


def write_space(out, model: str, bundle: bool = False) -> Path:
    """Write a Space folder: app.py, leo_mini_app.py, requirements.txt, README.md (Space metadata), examples/.

    `model` is a Hub repo id, or, with `bundle`, a local checkpoint folder copied into the Space as `model/` (its
    weights tracked by Git LFS through `.gitattributes`, as the Hub requires for large files). A local folder without
    `bundle` is refused: a pushed Space cannot read this machine's disk.
    """
    from ..folders import write_folder_atomically

    local = Path(model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} is not a checkpoint folder (no config.json)")
        if not bundle:
            raise ValueError(f"{local} is a folder on this machine, which a pushed Space cannot read: pass its Hub "
                             "repo id (ORG/NAME) after `leo-mini push`, or add --bundle to copy the checkpoint into "
                             "the Space (its weights go through Git LFS)")
    elif bundle:
        raise ValueError(f"--bundle copies a local checkpoint folder into the Space; {model!r} is not a folder")
    elif model.count("/") != 1 or model.startswith(("/", ".")) or model.endswith("/"):
        raise ValueError(f"--model must be a local checkpoint folder or a Hub repo id (ORG/NAME), got {model!r}")
    gradio_version = installed_version("gradio")
    space_requirements = requirements()

    def write(folder: Path) -> None:
        shutil.copyfile(APP_MODULE, folder / "leo_mini_app.py")
        model_id = model
        if bundle:
            shutil.copytree(local, folder / BUNDLED_MODEL)
            (folder / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                                   "*.png filter=lfs diff=lfs merge=lfs -text\n")
            model_id = BUNDLED_MODEL  # relative: a Space runs app.py from its own folder
        (folder / "app.py").write_text('"""LEO-MINI demo Space, written by `leo-mini space`."""\n\n'
                                       "from leo_mini_app import main\n\n"
                                       f"main({model_id!r}, examples_dir='examples')\n")
        (folder / "requirements.txt").write_text(space_requirements)
        (folder / "README.md").write_text(space_readme(model, gradio_version, hub_model=not bundle))
        examples = folder / "examples"
        examples.mkdir()
        questions = json.loads((DEMO_EXAMPLES / "questions.json").read_text())
        for item in questions:
            shutil.copyfile(DEMO_EXAMPLES / item["image"], examples / item["image"])
        (examples / "questions.json").write_text(json.dumps(questions, indent=2) + "\n")

    return write_folder_atomically(out, write)
