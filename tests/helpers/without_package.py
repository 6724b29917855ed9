"""Run code in a fresh interpreter where `leo_mini_hf` cannot be imported: what a user who has only transformers
and a checkpoint folder runs. The block is the export's own (`leo_mini_hf/hub/verify_reload.py`), loaded by path."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

import leo_mini_hf.hub

HUB_DIR = Path(leo_mini_hf.hub.__file__).resolve().parent
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


def make_image(seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))


def run_without_package(folder, body: str) -> dict:
    """Run `body` where `leo_mini_hf` cannot be imported (`folder`, `make_image` and `CHAT` are defined for it); it
    prints JSON last, which is returned."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(HUB_DIR)!r})
        import verify_reload
        verify_reload.block_package_import()
        sys.path.pop(0)
        import json, numpy as np, torch
        from PIL import Image
        from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline
        folder = {str(folder)!r}
        def make_image(seed):
            return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))
        CHAT = {CHAT!r}
        try:
            import leo_mini_hf  # noqa: F401
            raise SystemExit("leo_mini_hf was importable")
        except ImportError:
            pass
    """) + textwrap.dedent(body)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
