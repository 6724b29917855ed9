"""`leo-mini export`: a checkpoint folder → a verified, Hub-ready folder with a model card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from ..folders import require_path, write_folder_atomically
from ..modeling import LeoMiniForConditionalGeneration
from ..processor import LeoMiniProcessor
from .checkpoint_folder import save_for_hub
from .model_card import render_model_card

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_safetensors_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor stored in a folder's safetensors files (sharded or not)."""
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    if not tensors:
        raise ValueError(f"No safetensors weights in {folder}")
    return tensors


# Prepended to code run in a fresh interpreter that must work with transformers alone.
BLOCK_PACKAGE_IMPORT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "leo_mini_hf" or name.startswith("leo_mini_hf."):
            raise ImportError("leo_mini_hf is blocked in this process")
sys.meta_path.insert(0, _Block())
"""

# The verification child exits as soon as its parent is gone (a killed `leo-mini export` leaves no orphan running).
# The parent passes its pid as the last argument. On Linux the kernel kills the child when the parent dies
# (PR_SET_PDEATHSIG); a thread that polls the parent pid could not run while `import torch` holds the GIL for seconds.
# Checking the parent after setting the signal covers a parent that died before: during the child's start-up.
EXIT_WITH_PARENT = """
import ctypes, os, signal, sys, threading, time
_parent = int(sys.argv.pop())
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
def _exit_when_orphaned():
    while os.getppid() == _parent:
        time.sleep(0.2)
    os._exit(1)
if os.getppid() != _parent:
    os._exit(1)
threading.Thread(target=_exit_when_orphaned, daemon=True).start()  # elsewhere, and a second guard on Linux
"""

RELOAD_CHECK = EXIT_WITH_PARENT + BLOCK_PACKAGE_IMPORT + """
import json
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
config = model.config
ids = torch.tensor([[config.image_token_id] * config.num_image_tokens + [1, 2, 3]])
pixels = torch.linspace(-1, 1, 3 * config.image_size ** 2).reshape(1, 3, config.image_size, config.image_size)
with torch.no_grad():
    logits = model(input_ids=ids, pixel_values=pixels.to(model.dtype)).logits[0, -1].float()
print(json.dumps(logits.tolist()))
"""


def _reference_logits(model) -> torch.Tensor:
    config = model.config
    ids = torch.tensor([[config.image_token_id] * config.num_image_tokens + [1, 2, 3]])
    pixels = torch.linspace(-1, 1, 3 * config.image_size**2).reshape(1, 3, config.image_size, config.image_size)
    with torch.no_grad():
        return model.eval()(input_ids=ids, pixel_values=pixels.to(model.dtype)).logits[0, -1].float()


def verify_export(source_tensors: dict, folder: Path, model, dtype) -> None:
    """Every source tensor is in the output, bit-identical (or exactly cast to `dtype`); the folder reloads in a
    fresh process without leo_mini_hf and computes the same logits (within 1e-4 in float32, 2e-2 in half precision:
    the same weights at other memory addresses may take other SIMD paths, which changes the last bits)."""
    exported = read_safetensors_folder(folder)
    for key, tensor in source_tensors.items():
        if key not in exported:
            raise ValueError(f"Export lost tensor {key}")
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        if exported[key].dtype != expected.dtype or not torch.equal(exported[key], expected):
            raise ValueError(f"Export changed tensor {key}")
    reload = subprocess.run([sys.executable, "-c", RELOAD_CHECK, str(folder), str(os.getpid())], capture_output=True,
                            text=True, timeout=1800)
    if reload.returncode != 0:
        raise ValueError(f"The exported folder does not reload without leo_mini_hf:\n{reload.stderr[-2000:]}")
    reloaded = torch.tensor(json.loads(reload.stdout.strip().splitlines()[-1]))
    reference = _reference_logits(model)
    tolerance = 1e-4 if dtype in (None, torch.float32) else 2e-2  # half precision: a few units in the last place
    if not torch.allclose(reloaded, reference, rtol=tolerance, atol=tolerance):
        difference = (reloaded - reference).abs().max().item()
        raise ValueError(f"The exported folder reloads but computes different logits (max difference {difference:.3g})")


def export_checkpoint(model_dir, out, max_shard_size: str = "5GB", dtype: str | None = None,
                      repo_id: str | None = None, license_name: str = "apache-2.0",
                      base_models: list[str] | None = None) -> Path:
    """Write a verified Hub-ready folder: sharded safetensors + index, config with auto_map, processor, tokenizer,
    chat template, remote code, generation_config.json and README.md (model card). Nothing is left at `out`
    unless every check passed."""
    model_dir = require_path(model_dir, "The model")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    source_tensors = read_safetensors_folder(model_dir)
    model = LeoMiniForConditionalGeneration.from_pretrained(model_dir)
    processor = LeoMiniProcessor.from_pretrained(model_dir)
    if dtype is not None:
        model = model.to(DTYPES[dtype])

    def write(staging: Path) -> None:
        save_for_hub(model, processor, staging, max_shard_size=max_shard_size)
        card = render_model_card(model, repo_id or f"your-org/{Path(out).name}", license_name, base_models or [])
        (staging / "README.md").write_text(card, encoding="utf-8")
        verify_export(source_tensors, staging, model, DTYPES.get(dtype))

    return write_folder_atomically(out, write)
