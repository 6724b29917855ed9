"""`leo-mini export`: a checkpoint folder → a verified, Hub-ready folder with a model card."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..dtypes import dtype_named
from ..folders import require_path, write_folder_atomically
from ..modeling import LeoMiniForConditionalGeneration
from ..processor import LeoMiniProcessor
from .checkpoint_folder import save_for_hub
from .model_card import card_facts, eval_results_from
from .verify_reload import reference_inputs

VERIFY_RELOAD = Path(__file__).with_name("verify_reload.py")  # run by path: it must not import this package


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


def _reference_logits(model) -> torch.Tensor:
    input_ids, pixel_values = reference_inputs(model.config)
    with torch.no_grad():
        return model.eval()(input_ids=input_ids, pixel_values=pixel_values.to(model.dtype)).logits[0, -1].float()


def verify_export(source_tensors: dict, folder: Path, dtype) -> None:
    """Every source tensor is in the output, bit-identical (or exactly cast to `dtype`); the folder reloads in a
    fresh process without leo_mini_hf and computes the logits it computes loaded here with the package, the same way
    (`from_pretrained(folder)`): like with like, whatever dtype each part loads in. (Within 1e-4 in float32, 2e-2 in
    half precision: the same weights at other memory addresses may take other SIMD paths, which changes the last
    bits.) A model cast in memory is no reference: `.to(dtype)` also casts buffers a load computes in float32 (the
    LLM's rotary frequencies), which moved half-precision logits by up to 0.375."""
    progress = tqdm(total=3, desc="verifying the export: tensors")
    exported = read_safetensors_folder(folder)
    for key, tensor in source_tensors.items():
        if key not in exported:
            raise ValueError(f"Export lost tensor {key}")
        expected = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        if exported[key].dtype != expected.dtype or not torch.equal(exported[key], expected):
            raise ValueError(f"Export changed tensor {key}")
    progress.update()
    progress.set_description("verifying the export: reloading without leo_mini_hf")
    reload = subprocess.run([sys.executable, str(VERIFY_RELOAD), str(folder), str(os.getpid())], capture_output=True,
                            text=True, timeout=1800)
    if reload.returncode != 0:
        raise ValueError(f"The exported folder does not reload without leo_mini_hf:\n{reload.stderr[-2000:]}")
    reloaded = torch.tensor(json.loads(reload.stdout.strip().splitlines()[-1]))
    progress.update()
    progress.set_description("verifying the export: logits with leo_mini_hf")
    reference = _reference_logits(LeoMiniForConditionalGeneration.from_pretrained(folder))
    progress.update()
    progress.close()
    tolerance = 1e-4 if dtype in (None, torch.float32) else 2e-2  # half precision: a few units in the last place
    if not torch.allclose(reloaded, reference, rtol=tolerance, atol=tolerance):
        difference = (reloaded - reference).abs().max().item()
        raise ValueError(f"The exported folder loads without leo_mini_hf (transformers and its remote code) but "
                         f"computes other logits than the same folder loaded with leo_mini_hf (max difference "
                         f"{difference:.3g} > {tolerance}): its remote code does not match the installed package; "
                         "export again with this version")


def export_checkpoint(model_dir, out, max_shard_size: str = "5GB", dtype: str | None = None,
                      repo_id: str | None = None, license_name: str = "apache-2.0",
                      base_models: list[str] | None = None, datasets: list[str] | None = None,
                      eval_result_files: list | None = None) -> Path:
    """Write a verified Hub-ready folder: sharded safetensors + index, config with auto_map, processor, tokenizer,
    chat template, remote code, generation_config.json and README.md (model card: the base models and datasets the
    source folder's card names, and these; `eval_result_files` from `leo-mini eval --output` as its model-index).
    Nothing is left at `out` unless every check passed."""
    model_dir = require_path(model_dir, "The model")
    torch_dtype = dtype_named(dtype, "--dtype") if dtype is not None else None
    known = card_facts(model_dir)
    facts = {"repo_id": repo_id or f"your-org/{Path(out).name}", "license_name": license_name,
             "base_models": known["base_models"] + list(base_models or []),
             "datasets": known["datasets"] + list(datasets or []),
             "eval_results": eval_results_from(eval_result_files or [])}
    source_tensors = read_safetensors_folder(model_dir)
    model = LeoMiniForConditionalGeneration.from_pretrained(model_dir)
    processor = LeoMiniProcessor.from_pretrained(model_dir)
    if torch_dtype is not None:
        model = model.to(torch_dtype)

    def write(staging: Path) -> None:
        save_for_hub(model, processor, staging, max_shard_size=max_shard_size, card=facts)
        verify_export(source_tensors, staging, torch_dtype)

    return write_folder_atomically(out, write)
