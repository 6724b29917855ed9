"""The export's reload check, run as a script in a fresh interpreter where `leo_mini_hf` cannot be imported: the
exported folder must load with transformers and its remote code alone. Prints the logits of `reference_inputs` as
JSON on its last line.

    python verify_reload.py FOLDER PARENT_PID

Run by path, this file imports nothing of the package (it is not imported as `leo_mini_hf.hub.verify_reload` then);
the parent process imports it as a module for `reference_inputs`, so both sides build the same inputs.
"""

import ctypes
import importlib.abc
import json
import os
import signal
import sys
import threading
import time


def exit_with_parent(parent_pid: int) -> None:
    """Exit as soon as the parent is gone, so a killed `leo-mini export` leaves no orphan running. On Linux the
    kernel kills this process when the parent dies (PR_SET_PDEATHSIG): a thread polling the parent could not run
    while `import torch` holds the GIL for seconds. The check after setting it covers a parent that died during this
    process's start-up; the polling thread covers other systems."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)

    def exit_when_orphaned():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()


class BlockPackageImport(importlib.abc.MetaPathFinder):
    """Makes `import leo_mini_hf` (and its submodules) fail in this process."""

    def find_spec(self, name, path=None, target=None):
        if name == "leo_mini_hf" or name.startswith("leo_mini_hf."):
            raise ImportError("leo_mini_hf is blocked in this process")


def block_package_import() -> None:
    sys.meta_path.insert(0, BlockPackageImport())


def reference_inputs(config):
    """(input_ids (1, N_V + 3), pixel_values (1, 3, S, S)): one image's tokens, three text tokens, fixed pixels."""
    import torch

    input_ids = torch.tensor([[config.image_token_id] * config.num_image_tokens + [1, 2, 3]])
    pixel_values = torch.linspace(-1, 1, 3 * config.image_size**2).reshape(1, 3, config.image_size, config.image_size)
    return input_ids, pixel_values


def main(folder: str) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoProcessor.from_pretrained(folder, trust_remote_code=True)  # the processor must load too
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    input_ids, pixel_values = reference_inputs(model.config)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=pixel_values.to(model.dtype)).logits[0, -1].float()
    print(json.dumps(logits.tolist()))


if __name__ == "__main__":
    exit_with_parent(int(sys.argv[2]))
    block_package_import()
    main(sys.argv[1])
