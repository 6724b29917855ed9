"""Seconds per forward+backward with logits for every position vs only from the first labelled one (LEO-MINI-Smol).

`LeoMiniTrainer` passes `logits_to_keep=logits_to_keep_for_labels(labels)` in training steps, so the vocabulary
projection (576 × 49,152 for SmolLM2) and the cross-entropy skip the prompt positions, whose logits the loss never
reads. This times the model's forward+backward on the same collated batches both ways, alternating the two so
that machine noise falls on both, and checks that the losses and the gradients agree. Prints a table; writes
JSON + markdown.

    python benchmarks/loss_logits_speedup.py
"""

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from common import ROOT
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.mosaic import mosaic_training_mix
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.feature_cache import VisionFeatureCache
from leo_mini_hf.training.stages import apply_training_stage
from leo_mini_hf.training.trainer import logits_to_keep_for_labels

MODES = ("every position", "labelled positions only")


def forward_backward(model, batch: dict, mode: str) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(seconds, loss, gradients) of one forward+backward."""
    model.zero_grad(set_to_none=True)
    extra = {"logits_to_keep": logits_to_keep_for_labels(batch["labels"])} if mode == MODES[1] else {}
    started = time.perf_counter()
    loss = model(**batch, **extra).loss
    loss.backward()
    seconds = time.perf_counter() - started
    gradients = {name: param.grad.detach().clone() for name, param in model.named_parameters() if param.grad is not None}
    return seconds, float(loss.detach()), gradients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the batches per mode")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--visual-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "loss_logits_speedup")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", num_visual_tokens=args.visual_tokens)
    apply_training_stage(model, "finetune")
    model.train()
    VisionFeatureCache(args.work_dir / "feature-cache").attach(model)  # the expert's cost is not what is timed
    data, _ = mosaic_training_mix(args.seed)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed)).tolist()
    collate = LeoMiniDataCollator(processor)
    batches = [collate([data[i] for i in order[b * args.batch_size:(b + 1) * args.batch_size]])
               for b in range(args.batches)]

    seconds = {mode: [] for mode in MODES}
    max_loss_difference = max_gradient_difference = 0.0
    for batch in batches:
        forward_backward(model, batch, MODES[0])  # warm-up: fills the feature cache, first-call allocations
    for _ in range(args.repeats):
        for batch in batches:
            results = {mode: forward_backward(model, batch, mode) for mode in MODES}
            for mode, (elapsed, _, _) in results.items():
                seconds[mode].append(elapsed)
            (_, loss_all, grads_all), (_, loss_kept, grads_kept) = results[MODES[0]], results[MODES[1]]
            max_loss_difference = max(max_loss_difference, abs(loss_all - loss_kept))
            max_gradient_difference = max(max_gradient_difference, *(
                float((grads_all[name] - grads_kept[name]).abs().max()) for name in grads_all))
    sequence_lengths = [batch["input_ids"].shape[1] for batch in batches]
    kept_positions = [logits_to_keep_for_labels(batch["labels"]) for batch in batches]
    median = {mode: statistics.median(values) for mode, values in seconds.items()}
    machine = f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}"
    command = ("python benchmarks/loss_logits_speedup.py " + " ".join(sys.argv[1:])).strip()
    lines = [f"# Training step: logits for every position vs labelled positions only\n\nCommand: `{command}`  \n"
             f"Machine: {machine}  \nLEO-MINI-Smol (MobileNetV2 at 448 px → CoTR {args.visual_tokens}), stage 3 "
             f"(finetune), {args.batches} batches of {args.batch_size} from the mosaic task's training mix, "
             f"forward+backward (no optimizer step), expert features from the cache, median of "
             f"{args.repeats * args.batches} per mode, the modes alternated. Sequence length per batch: "
             f"{min(sequence_lengths)}-{max(sequence_lengths)}; positions projected when only labelled ones are: "
             f"{min(kept_positions)}-{max(kept_positions)}. Largest loss difference {max_loss_difference:.2e}, "
             f"largest gradient difference {max_gradient_difference:.2e}.\n",
             "| logits for | s per forward+backward (median) | speed-up |", "|---|---|---|"]
    for mode in MODES:
        lines.append(f"| {mode} | {median[mode]:.3f} | {median[MODES[0]] / median[mode]:.2f}× |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loss_logits_speedup.md").write_text("\n".join(lines) + "\n")
    (args.out / "loss_logits_speedup.json").write_text(json.dumps(
        {"command": command, "machine": machine, "visual_tokens": args.visual_tokens, "batch_size": args.batch_size,
         "sequence_lengths": sequence_lengths, "kept_positions": kept_positions, "seconds": seconds,
         "median_seconds": median, "max_loss_difference": max_loss_difference,
         "max_gradient_difference": max_gradient_difference}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
