"""Seconds per training step with and without the frozen-expert feature cache (LEO-MINI-Smol, stage 3, easy-vqa).

Three runs of the same steps from the same start: the plain path; a cold cache (every image computed once and
written); a warm cache (every image read back, as in a second epoch or another run). Also checks that the three
loss curves agree. Prints a table; writes JSON + markdown.

    python benchmarks/feature_cache_speedup.py
"""

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from common import ROOT
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.feature_cache import VisionFeatureCache
from leo_mini_hf.training.stages import apply_training_stage
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments


def timed_run(args, mode: str) -> dict:
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", num_visual_tokens=args.visual_tokens)
    apply_training_stage(model, "finetune")
    cache = None
    if mode != "plain":
        cache = VisionFeatureCache(args.work_dir / "speedup-cache")
        cache.attach(model)
    training = default_training_arguments(
        output_dir=str(args.work_dir / "runs" / "speedup"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=1e-3, logging_steps=1, save_strategy="no", seed=args.seed,
        data_seed=args.seed, use_cpu=True, disable_tqdm=True,
    )
    trainer = LeoMiniTrainer(model=model, args=training, train_dataset=EasyVQADataset("train"),
                             data_collator=LeoMiniDataCollator(processor), processing_class=processor)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"mode": mode, "seconds_per_step": round(seconds / args.steps, 3),
            "cache": cache.stats() if cache is not None else None,
            "losses": [log["loss"] for log in trainer.state.log_history if "loss" in log]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--visual-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "feature_cache_speedup")
    args = parser.parse_args()
    torch.set_num_threads(2)
    shutil.rmtree(args.work_dir / "speedup-cache", ignore_errors=True)  # the cold run must start empty
    runs = [timed_run(args, mode) for mode in ("plain", "cold cache", "warm cache")]
    plain = runs[0]["seconds_per_step"]
    max_loss_difference = max(abs(a - b) for run in runs[1:] for a, b in zip(run["losses"], runs[0]["losses"]))
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    command = "python benchmarks/feature_cache_speedup.py " + " ".join(sys.argv[1:])
    lines = [f"# Feature cache: seconds per training step\n\nCommand: `{command.strip()}`  \nMachine: {machine}  \n"
             f"LEO-MINI-Smol (MobileNetV2 at 448 px → CoTR {args.visual_tokens}), stage 3, easy-vqa train, batch "
             f"{args.batch_size}, {args.steps} steps per run. Largest loss difference from the plain run: "
             f"{max_loss_difference:.2e}.\n", "| run | s/step | speed-up | cache hits / misses |", "|---|---|---|---|"]
    for run in runs:
        stats = "–" if run["cache"] is None else f"{run['cache']['hits']} / {run['cache']['misses']}"
        lines.append(f"| {run['mode']} | {run['seconds_per_step']:.3f} | {plain / run['seconds_per_step']:.2f}× | "
                     f"{stats} |")
    (args.out / "feature_cache_speedup.md").write_text("\n".join(lines) + "\n")
    (args.out / "feature_cache_speedup.json").write_text(json.dumps(
        {"command": command.strip(), "machine": machine, "steps": args.steps, "batch_size": args.batch_size,
         "visual_tokens": args.visual_tokens, "max_loss_difference": max_loss_difference, "runs": runs}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
