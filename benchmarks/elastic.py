"""Elastic CoTR: one LEO-MINI-Smol serving 1, 4 and 16 visual tokens, against models trained for one budget alone.

The elastic row trains exactly as object_named.py's rows (same data mix, steps, batch, learning rate, seed, warm start
from the shipped easy-vqa demo weights with all 16 of its CoTR queries), with `cotr_budgets=[1, 4, 16]`: each
optimizer step trains at one budget drawn uniformly (or by `--budget-weights`), seeded by the step, or with
`--budget-loss summed` at every budget (one pass each, so a step costs about three). Then it is
evaluated at every budget on the same test questions as the single-budget rows (object-named 2×2 and 3×3 with the
swapped-image control, easy-vqa test), with CoTR's named-cell share and the prefill time per budget, and compared with
object_named.py's `cotr-k` rows of the same seed (their JSON; a missing row is reported as missing).

Resumable: training resumes from its last checkpoint; the trained weights are saved before any evaluation, and each
budget's evaluation is kept in the run folder as it finishes. Evaluation always loads the saved (float16) weights, so
an interrupted evaluation continues on the same weights.

    python benchmarks/elastic.py                  # train (resumable), evaluate every budget, table and plot
    python benchmarks/elastic.py --report-only
    python benchmarks/elastic.py --name cotr-elastic-w114 --budget-weights 1 1 4 --out benchmarks/results/elastic/w114
    python benchmarks/elastic.py --name cotr-elastic-summed --budget-loss summed --out benchmarks/results/elastic/summed
"""

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from common import (ELASTIC_BUDGETS, GRIDS, ROOT, SHORT_TYPE_NAMES, WARM_PARTS, AttentionShareProbe, TrainingTimer,
                    accuracy_by_tokens_figure, add_object_named_arguments, assemble_elastic_model, display_path,
                    named_cell_shares, share_cell, train_resumably, warm_start, with_std_errors, write_results)
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.easyvqa.evaluation import evaluate_vqa, prefill_seconds
from leo_mini_hf.easyvqa.object_named import ANSWERS, ObjectNamedMosaicDataset, object_named_training_mix
from leo_mini_hf.training.adapter_weights import load_adapter_weights, save_adapter_weights
from leo_mini_hf.training.elastic import BUDGET_LOSSES
from leo_mini_hf.training.feature_cache import VisionFeatureCache
from leo_mini_hf.training.stages import apply_training_stage

BUDGETS = ELASTIC_BUDGETS
NAME = "cotr-elastic"


def build_model(args):
    torch.manual_seed(args.seed)
    return assemble_elastic_model(args.work_dir)


def train(args, run_dir: Path) -> dict:
    """Train the elastic row (resumable) and save its trained parts; returns what the result records of training."""
    model, processor = build_model(args)
    warm_start_record = warm_start(model, WARM_PARTS["reducer"])
    apply_training_stage(model, "finetune")
    cache = VisionFeatureCache(args.feature_cache) if args.feature_cache else None
    if cache is not None:
        cache.attach(model)
    train_set, data_description = object_named_training_mix(args.seed, args.train_size)
    probe_log = run_dir / "attention_share.jsonl"
    if TrainingTimer.last_complete_checkpoint(run_dir) is None:
        probe_log.unlink(missing_ok=True)
    probe = AttentionShareProbe(model, processor, probe_log, args.probe_mosaics, num_visual_tokens=BUDGETS[0])
    trainer, train_seconds = train_resumably(model, processor, train_set, run_dir, args, label=args.name,
                                             callbacks=[probe], budget_weights=args.budget_weights,
                                             budget_loss=args.budget_loss)
    if cache is not None:
        cache.detach(model)
    record = {
        "warm_start": warm_start_record, "data": data_description,
        "budget_weights": args.budget_weights, "budget_loss": args.budget_loss, "probe_mosaics": args.probe_mosaics,
        "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "seed": args.seed, "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / args.steps, 3),
        "loss_curve": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "aux_loss_curve": [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log],
        "budget_per_step_counts": {str(k): sum(any(budget == k for _, budget in trainer.step_budgets(step))
                                               for step in range(args.steps)) for k in BUDGETS},
        "named_cell_share_during_training_at_budget_1": [
            json.loads(line) for line in probe_log.read_text().splitlines()] if probe_log.exists() else [],
    }
    save_adapter_weights(model, run_dir / "trained.safetensors",
                         metadata={"config": json.dumps({"cotr_budgets": BUDGETS}), "steps": str(args.steps),
                                   "seed": str(args.seed)})
    (run_dir / "training.json").write_text(json.dumps(record, indent=2))
    return record


def evaluate_budget(model, processor, budget: int, args) -> dict:
    tests = {f"object-{grid}x{grid}": ObjectNamedMosaicDataset("test", grid, size=args.eval_size, seed=args.seed)
             for grid in GRIDS}
    result = {"budget": budget, "test": {}, "test_images_swapped": {}, "named_cell_share": {}}
    for set_name, dataset in tests.items():
        result["test"][set_name] = with_std_errors(evaluate_vqa(model, processor, dataset, batch_size=16,
                                                                seed=args.seed, num_visual_tokens=budget))
        result["test_images_swapped"][set_name] = with_std_errors(evaluate_vqa(
            model, processor, dataset, batch_size=16, seed=args.seed, swap_images=True, num_visual_tokens=budget))
        samples = [dataset[i] for i in range(min(len(dataset), args.share_mosaics))]
        result["named_cell_share"][set_name] = named_cell_shares(model, samples, processor, dataset.grid, budget)
    result["test"]["easy-vqa"] = with_std_errors(evaluate_vqa(model, processor, EasyVQADataset("test"),
                                                              limit=args.easy_vqa_limit, batch_size=16,
                                                              seed=args.seed, num_visual_tokens=budget))
    result["prefill_seconds"] = prefill_seconds(model, processor, tests["object-3x3"][0], num_visual_tokens=budget)
    return result


def run(args, save) -> None:
    """Train (resumable), then evaluate every budget, the largest first; `save(result)` after each budget."""
    run_dir = args.work_dir / "runs" / "elastic" / f"seed-{args.seed}" / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "training.json").exists():
        print(f"{args.name} (seed {args.seed}): training {args.steps} steps at budgets {BUDGETS} ...", flush=True)
        train(args, run_dir)
    if args.train_only:
        print(f"{args.name}: trained; {display_path(run_dir / 'training.json')}", flush=True)
        return
    result = {"name": args.name, "budgets": BUDGETS, **json.loads((run_dir / "training.json").read_text()),
              "evaluated_weights": "trained.safetensors (float16)", "at_budget": {}}
    model, processor = build_model(args)
    load_adapter_weights(model, run_dir / "trained.safetensors")
    model.eval()
    for budget in sorted(BUDGETS, reverse=True):  # the largest first: where an elastic model has lost so far
        path = run_dir / f"evaluation-{budget}.json"
        if not path.exists():
            print(f"{args.name}: evaluating at {budget} visual tokens ...", flush=True)
            path.write_text(json.dumps(evaluate_budget(model, processor, budget, args), indent=2))
        result["at_budget"][str(budget)] = json.loads(path.read_text())
        save(result)


def single_budget_rows(object_named_dir: Path, seed: int) -> dict:
    """object_named.py's `cotr-k` results of this seed, by budget k (those that exist)."""
    rows = {}
    for budget in BUDGETS:
        path = object_named_dir / f"seed-{seed}" / f"cotr-{budget}.json"
        if path.exists():
            rows[budget] = json.loads(path.read_text())
    return rows


def write_report(result: dict, alone: dict, out: Path, command: str) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    kinds = list(ANSWERS)
    weighting = 'uniformly' if result['budget_weights'] is None else 'with weights ' + str(result['budget_weights'])
    alone_steps = " / ".join(sorted({str(row["steps"]) for row in alone.values()})) or "no"
    budget_draw = (f"every optimizer step at every budget, the losses weighted {weighting}"
                   if result.get("budget_loss") == "summed" else f"one budget per optimizer step drawn {weighting}")
    lines = ["# Elastic CoTR: one LEO-MINI-Smol at 1, 4 and 16 visual tokens", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Elastic: `cotr_budgets={BUDGETS}`, {budget_draw}"
             f" (steps per budget: {result['budget_per_step_counts']}); {result['steps']} steps, batch "
             f"{result['batch_size']}, lr {result['learning_rate']}, seed {result['seed']}, the same data and warm "
             "start as object_named.py's rows. *alone*: object_named.py's `cotr-k` row, trained for that budget only, "
             f"{alone_steps} steps, the same data and seed. ± one standard error; *Δ*: elastic − alone on all three "
             "question types, in standard errors of the difference.", "",
             *([f"**Partial**: evaluated so far at {sorted(map(int, result['at_budget']))} tokens only.", ""]
               if not result.get("complete", True) else []),
             "| tokens | model | " + " | ".join(f"{g}×{g} {SHORT_TYPE_NAMES[k]}" for g in GRIDS for k in kinds)
             + " | 2×2 all | 3×3 all | swapped 2×2 / 3×3 | easy-vqa | named-cell share 3×3 | prefill ms |",
             "|---" * (8 + len(GRIDS) * len(kinds)) + "|"]

    def row(label: str, budget: int, evaluation: dict) -> str:
        cells = [f"{evaluation['test'][f'object-{g}x{g}']['per_type'][k]:.2f} ± "
                 f"{evaluation['test'][f'object-{g}x{g}']['per_type_std_error'][k]:.2f}" for g in GRIDS for k in kinds]
        overall = [f"{evaluation['test'][f'object-{g}x{g}']['accuracy']:.3f} ± "
                   f"{evaluation['test'][f'object-{g}x{g}']['std_error']:.3f}" for g in GRIDS]
        swapped = " / ".join(f"{evaluation['test_images_swapped'][f'object-{g}x{g}']['accuracy']:.2f}" for g in GRIDS)
        share = share_cell(evaluation, "object-3x3")
        easy = evaluation["test"]["easy-vqa"]
        return (f"| {budget} | {label} | " + " | ".join(cells + overall) + f" | {swapped} | "
                f"{easy['accuracy']:.3f} ± {easy['std_error']:.3f} | {share} | "
                f"{1000 * evaluation['prefill_seconds']:.0f} |")

    deltas = []
    for budget in BUDGETS:
        elastic = result["at_budget"].get(str(budget))
        if elastic is not None:
            lines.append(row("elastic", budget, elastic))
        if budget in alone:
            lines.append(row("alone", budget, alone[budget]))
        else:
            lines.append(f"| {budget} | alone | missing: object_named.py row cotr-{budget} has not run |"
                         + " |" * (5 + len(GRIDS) * len(kinds)))
        if elastic is not None and budget in alone:
            for grid in GRIDS:
                a, b = elastic["test"][f"object-{grid}x{grid}"], alone[budget]["test"][f"object-{grid}x{grid}"]
                difference = a["accuracy"] - b["accuracy"]
                std_error = (a["std_error"] ** 2 + b["std_error"] ** 2) ** 0.5
                deltas.append(f"{budget} tokens, {grid}×{grid}: {difference:+.3f} ({difference / std_error:+.1f} SE)")
    if deltas:
        lines += ["", "Δ elastic − alone (all question types): " + "; ".join(deltas) + "."]
    during = result.get("named_cell_share_during_training_at_budget_1") or []
    if during:
        lines += ["", "Named-cell share at budget 1 during training (all types; "
                  f"{result['probe_mosaics']} test mosaics per grid at each checkpoint):", "",
                  "| step | 2×2 | 3×3 |", "|---|---|---|"]
        for entry in during:
            lines.append(f"| {entry['step']} | "
                         + " | ".join(share_cell({"named_cell_share": entry}, f"{g}x{g}") for g in GRIDS) + " |")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "elastic", {"command": command, "machine": machine, "elastic": result,
                                    "alone": {str(k): v for k, v in alone.items()}}, lines)
    plot(result, alone, out / "elastic.png")


def plot(result: dict, alone: dict, path: Path) -> None:
    elastic = {int(budget): evaluation for budget, evaluation in result["at_budget"].items()}

    def draw(axis, grid):
        key = f"object-{grid}x{grid}"
        series = (("elastic (one model)", elastic, "-o"), ("trained for that budget alone", alone, "s"))
        for label, rows, style in series:
            points = sorted((budget, rows[budget]["test"][key]["accuracy"], rows[budget]["test"][key]["std_error"])
                            for budget in rows)
            if points:
                budgets, accuracies, errors = zip(*points)
                axis.errorbar(budgets, accuracies, yerr=errors, fmt=style, capsize=3, label=label)
        axis.set_xticks(BUDGETS, [str(b) for b in BUDGETS])

    accuracy_by_tokens_figure(path, draw, legend_columns=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_object_named_arguments(parser)
    parser.add_argument("--budget-weights", type=float, nargs=len(BUDGETS), help=f"one per budget {BUDGETS}")
    parser.add_argument("--budget-loss", choices=BUDGET_LOSSES, default="sampled",
                        help="sampled: one budget drawn per step; summed: every budget every step (one pass each)")
    parser.add_argument("--train-only", action="store_true",
                        help="train (or find trained) and stop: e.g. to time a few steps (training.json)")
    parser.add_argument("--name", default=NAME, help="the row's name: its run folder and result file (a variant, "
                                                     "e.g. with --budget-weights, needs its own, and its own --out)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "elastic" / "sampled")
    parser.add_argument("--object-named", type=Path, default=ROOT / "benchmarks" / "results" / "object-named" / "unique",
                        help="object_named.py's results (the single-budget rows)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = args.out / f"seed-{args.seed}" / f"{args.name}.json"

    def save(result: dict) -> None:  # after each budget's evaluation: a partial result is committed as such
        result["command"] = shlex.join(["python", "benchmarks/elastic.py", *sys.argv[1:]])
        result["complete"] = sorted(map(int, result["at_budget"])) == BUDGETS
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        write_report(result, single_budget_rows(args.object_named, args.seed), args.out, result["command"])

    if not args.report_only and not (path.exists() and json.loads(path.read_text()).get("complete", True)):
        run(args, save)
    if path.exists():
        result = json.loads(path.read_text())
        print(f"{args.name} (seed {args.seed}): {display_path(path)}")
        write_report(result, single_budget_rows(args.object_named, args.seed), args.out, result["command"])


if __name__ == "__main__":
    main()
