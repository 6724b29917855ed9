"""Accuracy at a visual-token budget on easy-vqa: LEO-MINI-Smol with CoTR vs text-agnostic reducers vs full tokens.

Same LLM (SmolLM2-135M-Instruct), same expert (ImageNet MobileNetV2 at 448 px, 196 tokens), same data, steps and
seeds; only the visual-token path differs. Stage-3 recipe: CoTR/pooling + projector + MMoE train, LLM and expert
frozen. Resumable: each configuration's result is a JSON file, skipped when present, and a row interrupted while
training resumes from its last checkpoint (every `--checkpoint-steps`). The frozen expert's outputs are cached on
disk (keyed by image content and expert) and shared by all runs; `--no-feature-cache` turns that off.

    python benchmarks/accuracy_at_budget.py                 # easy-vqa: all configurations, then table and plot
    python benchmarks/accuracy_at_budget.py --task mosaic   # easy-vqa + 2×2/3×3 mosaics (the question decides where
                                                            # to look), tested on easy-vqa and on test mosaics
    python benchmarks/accuracy_at_budget.py --only cotr-16 --save-demo-weights
"""

import argparse
import json
import os
import platform
from pathlib import Path

import torch

from common import CONFIGS, RESULTS, ROOT, display_path, git_commit, train_resumably
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.easyvqa.evaluation import evaluate_vqa, prefill_seconds
from leo_mini_hf.easyvqa.mosaic import EasyVQAMosaicDataset, location_blind_accuracy, mosaic_training_mix
from leo_mini_hf.training.adapter_weights import save_adapter_weights
from leo_mini_hf.training.feature_cache import VisionFeatureCache
from leo_mini_hf.training.stages import apply_training_stage

VARIANT = {"no-mmoe": ", general LoRA only (no routed experts)", "sum": ", summed pooled terms (cotr_pooling='sum')",
           "pos": ", learned position embeddings in the scores",
           "pos-cos": ", learned position embeddings, cosine scores (cotr_score_scaling='cosine')"}
VARIANT_MARKER = {"no-mmoe": "x", "sum": "s", "pos": "^", "pos-cos": "v"}
METHOD = {"cotr": "CoTR (text-conditioned)", "avgpool": "average pooling", "queries": "learned queries, no text",
          "full": "full tokens (LLaVA-style)"}


def remeasure_prefill(name: str, path: Path, args) -> None:
    """Re-time one finished configuration's prefill: it depends on the architecture, not on the trained values."""
    result = json.loads(path.read_text())
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", **CONFIGS[name])
    result["prefill_seconds"] = prefill_seconds(model, processor, EasyVQADataset("test")[0])
    result["prefill_threads"] = torch.get_num_threads()
    path.write_text(json.dumps(result, indent=2))
    print(f"{name}: prefill {1000 * result['prefill_seconds']:.0f} ms", flush=True)


def training_set(args):
    """easy-vqa train; for the mosaic task also as many 2×2 and as many 3×3 train mosaics (a third each)."""
    if args.task == "easy-vqa":
        return EasyVQADataset("train"), {"easy-vqa": "train"}
    return mosaic_training_mix(args.seed)


def test_sets(args) -> dict:
    """Name → (dataset, limit): the seeded easy-vqa test sample; for the mosaic task also 2×2 and 3×3 test mosaics."""
    sets = {"easy-vqa": (EasyVQADataset("test"), args.eval_limit)}
    if args.task == "mosaic":
        for grid in (2, 3):
            sets[f"mosaic-{grid}x{grid}"] = (EasyVQAMosaicDataset("test", grid, size=args.eval_limit, seed=args.seed),
                                             None)
    return sets


def run_config(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", **CONFIGS[name])
    apply_training_stage(model, "finetune")
    cache = VisionFeatureCache(args.feature_cache) if args.feature_cache else None
    if cache is not None:
        cache.attach(model)
    train_set, data_description = training_set(args)
    run_dir = args.work_dir / "runs" / args.task / args.out.name / f"seed-{args.seed}" / name
    trainer, train_seconds = train_resumably(model, processor, train_set, run_dir, args, label=name)
    evaluations, sets = {}, test_sets(args)
    for set_name, (dataset, limit) in sets.items():
        evaluations[set_name] = evaluate_vqa(model, processor, dataset, limit=limit, batch_size=16, seed=args.seed)
    # the question-only control where answers are not balanced (easy-vqa's yes/no); mosaic answers are balanced
    control = evaluate_vqa(model, processor, sets["easy-vqa"][0], limit=args.eval_limit, batch_size=16, seed=args.seed,
                           swap_images=True)
    if cache is not None:
        cache.detach(model)  # prefill is timed on the plain path: the expert runs, as at inference
    result = {
        "name": name,
        "task": args.task,
        "overrides": CONFIGS[name],
        "visual_tokens": model.config.num_image_tokens,
        "expert_tokens": model.vision_experts[0].num_tokens,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "data": data_description,
        "feature_cache": cache is not None,
        "feature_cache_stats": cache.stats() if cache is not None else None,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / args.steps, 3),
        "loss_curve": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "aux_loss_curve": [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log],
        "test": evaluations["easy-vqa"],
        "test_images_swapped": control,
        "test_data": {set_name: dataset.description() if hasattr(dataset, "description") else
                      {"easy-vqa": "test", "seeded_sample": limit, "seed": args.seed}
                      for set_name, (dataset, limit) in sets.items()},
        "prefill_seconds": prefill_seconds(model, processor, sets["easy-vqa"][0][0]),
    }
    if args.task == "mosaic":
        result["mosaic_test"] = {k: v for k, v in evaluations.items() if k != "easy-vqa"}
    save_trained_weights(model, run_dir / "trained.safetensors", result)
    if args.save_demo_weights and name == args.demo_config:
        save_trained_weights(model, ROOT / "src" / "leo_mini_hf" / "assets" / "leo-mini-smol-easyvqa.safetensors",
                             result)
    return result


def save_trained_weights(model, path: Path, result: dict) -> None:
    save_adapter_weights(model, path, metadata={"config": json.dumps(CONFIGS[result["name"]]),
                                                "steps": str(result["steps"]), "seed": str(result["seed"]),
                                                "test_accuracy": f"{result['test']['accuracy']:.4f}"})


def family_and_variant(name: str) -> tuple[str, str]:
    """"cotr-16-pos-cos" → ("cotr", "pos-cos"); "avgpool-64" → ("avgpool", "")."""
    family, _, rest = name.partition("-")
    return family, rest.partition("-")[2]


def method_of(name: str) -> str:
    family, variant = family_and_variant(name)
    return METHOD[family] + VARIANT.get(variant, "")


def swapped(result: dict) -> str:
    """easy-vqa accuracy (all / yes-no) with each question shown another test image; rows run before the control
    existed have none."""
    control = result.get("test_images_swapped")
    return f"{control['accuracy']:.3f} / {control['per_type'].get('yes/no', 0):.3f}" if control else "–"


def number(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table_rows(results: list[dict], task: str) -> list[str]:
    if task == "easy-vqa":
        lines = ["| configuration | method | visual tokens | test accuracy | shape | colour | yes/no | "
                 "images swapped: all / yes/no | prefill (ms) | train s/step (threads) | feature cache |", "|---" * 11 + "|"]
        for r in results:
            per_type = r["test"]["per_type"]
            lines.append(f"| {r['name']} | {method_of(r['name'])} | {r['visual_tokens']} | {r['test']['accuracy']:.3f} | "
                         f"{per_type.get('shape', 0):.3f} | {per_type.get('colour', 0):.3f} | "
                         f"{per_type.get('yes/no', 0):.3f} | {swapped(r)} | "
                         f"{1000 * r['prefill_seconds']:.0f} | {r['seconds_per_step']:.2f} ({r.get('threads', 2)}) | "
                         f"{'yes' if r.get('feature_cache') else 'no'} |")
        return lines
    lines = ["| configuration | method | visual tokens | easy-vqa | easy-vqa, images swapped: all / yes/no | mosaic 2×2 | mosaic 3×3 | "
             "prefill (ms) | train s/step (threads) |", "|---" * 9 + "|"]
    for r in results:
        mosaic = r["mosaic_test"]
        lines.append(f"| {r['name']} | {method_of(r['name'])} | {r['visual_tokens']} | {r['test']['accuracy']:.3f} | "
                     f"{swapped(r)} | {mosaic['mosaic-2x2']['accuracy']:.3f} | "
                     f"{mosaic['mosaic-3x3']['accuracy']:.3f} | {1000 * r['prefill_seconds']:.0f} | "
                     f"{r['seconds_per_step']:.2f} ({r.get('threads', 2)}) |")
    kinds = ("colour at cell", "shape at cell", "where", "count")
    lines += ["", "Per question type (mosaic test sets). Answers are balanced, so uniform chance is 1/8 for colour, 1/3 "
              "for shape, 1/4 (2×2) or 1/9 (3×3) for where, 1/5 for count. But a mosaic always holds its answer, so "
              "answering a cell question with the colour/shape most frequent in the whole mosaic scores more without "
              "knowing where the cell is: the \"location-blind\" row (computed from the test mosaics; where: uniform "
              "chance; count needs no location).", "",
              "| configuration | visual tokens | " + " | ".join(f"{g} {k}" for g in ("2×2", "3×3") for k in kinds) + " |",
              "|---" * (2 + 2 * len(kinds)) + "|"]
    blind_cells = []
    for grid in (2, 3):
        description = results[0]["test_data"][f"mosaic-{grid}x{grid}"]
        blind = location_blind_accuracy(EasyVQAMosaicDataset(
            description["split"], grid, size=description["size"], seed=description["seed"]))
        blind_cells += [number(blind[f"mosaic {k}"], 2) for k in kinds[:2]] + [number(1 / grid**2, 2), "–"]
    lines.append("| location-blind: the commonest attribute | – | " + " | ".join(blind_cells) + " |")
    for r in results:
        cells = [number(r["mosaic_test"][f"mosaic-{g}x{g}"]["per_type"].get(f"mosaic {k}"), 2)
                 for g in (2, 3) for k in kinds]
        lines.append(f"| {r['name']} | {r['visual_tokens']} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: list[dict], out: Path, command: str, task: str, seed: int) -> Path:
    """Markdown table, JSON and PNG plot of one seed's rows (`out/seed-<n>.*`, beside the rows' folder); returns the
    markdown's path."""
    rows = sorted(results, key=lambda r: (r["name"].split("-")[0], -r["visual_tokens"], r["name"]))
    stem = f"seed-{seed}"
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} (threads per row: table)"
    first = rows[0]
    prefill_threads = "/".join(str(t) for t in sorted({r.get("prefill_threads", r.get("threads", 2)) for r in rows}))
    if task == "easy-vqa":
        title = f"# Accuracy at budget: easy-vqa test ({first['test']['count']} questions, seeded sample)\n\n"
        trained_on = "easy-vqa train"
    else:
        title = ("# Accuracy at budget where the question decides where to look: easy-vqa mosaics\n\n"
                 f"Test: {first['test']['count']} seeded easy-vqa test questions and "
                 f"{first['mosaic_test']['mosaic-2x2']['count']} questions each on 2×2 and 3×3 test mosaics "
                 f"(generator and seeds: `data`/`test_data` in the JSON).  \n")
        trained_on = "easy-vqa train + as many 2×2 and 3×3 train mosaics"
    header = (title + f"Command: `{command}`  \nMachine: {machine}  \nTrained on {trained_on}; steps {first['steps']}, "
              f"batch {first['batch_size']}, lr {first['learning_rate']}, seed {first['seed']}; expert tokens per "
              f"image: {first['expert_tokens']}. \"images swapped\": the same questions, each shown another test "
              "image — what the model answers from the question alone. Prefill: batch 1, one easy-vqa question, "
              f"plain path (the expert runs), median of 10, {prefill_threads} thread(s). Train s/step depends on the "
              "threads and on whether the feature cache was warm; runs with 1 thread ran two at a time.\n\n")
    (out / f"{stem}.md").write_text(header + "\n".join(table_rows(rows, task)) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"commit": git_commit(), "command": command, "machine": machine,
                                                 "results": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return out / f"{stem}.md"
    panels = [("easy-vqa", lambda r: r["test"]["accuracy"])] if task == "easy-vqa" else [
        (f"mosaic {g}×{g}", lambda r, g=g: r["mosaic_test"][f"mosaic-{g}x{g}"]["accuracy"]) for g in (2, 3)]
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for axis, (panel, accuracy) in zip(axes[0], panels):
        plot_panel(axis, rows, accuracy)
        axis.set_title(f"LEO-MINI-Smol: accuracy at a visual-token budget ({panel})", fontsize=10)
    figure.tight_layout()
    handles, labels = axes[0][0].get_legend_handles_labels()  # every panel plots the same rows
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=2, fontsize=8, frameon=False)
    figure.savefig(out / f"{stem}.png", dpi=120, bbox_inches="tight")
    return out / f"{stem}.md"


def plot_panel(axis, rows: list[dict], accuracy) -> None:
    for method in ("cotr", "avgpool", "queries", "full"):
        points = sorted((r["visual_tokens"], accuracy(r)) for r in rows
                        if family_and_variant(r["name"]) == (method, ""))
        if points:
            axis.plot(*zip(*points), marker="o", label=METHOD[method])
    for r in rows:
        variant = family_and_variant(r["name"])[1]
        if variant:
            axis.scatter([r["visual_tokens"]], [accuracy(r)], marker=VARIANT_MARKER[variant], color="black",
                         label=method_of(r["name"]), zorder=3)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens per image in the LLM")
    axis.set_ylabel("test accuracy (exact match)")
    axis.grid(alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-limit", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, help="the variant's folder (default: results/accuracy_at_budget/easy-vqa or "
                        "/mosaic); rows go to OUT/seed-<n>/, the table to OUT/seed-<n>.{md,json,png}")
    parser.add_argument("--save-demo-weights", action="store_true", help="ship the demo configuration's weights")
    parser.add_argument("--demo-config", default="cotr-16")
    parser.add_argument("--task", choices=["easy-vqa", "mosaic"], default="easy-vqa",
                        help="mosaic: train on easy-vqa + 2×2/3×3 mosaics, also test on mosaics")
    parser.add_argument("--feature-cache", type=Path, default=ROOT / "benchmarks" / ".work" / "feature-cache",
                        help="cache of the frozen expert's outputs, shared by all runs")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_const", const=None)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--checkpoint-steps", type=int, default=250,
                        help="save a resumable checkpoint every N steps (0: none); an interrupted row resumes from it")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the table and plot")
    parser.add_argument("--remeasure-prefill", action="store_true",
                        help="only re-time the prefill of every finished configuration (no training), e.g. after "
                             "runs that shared the machine; then rewrite the report")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    default_out = RESULTS / "accuracy_at_budget" / args.task
    args.out = args.out or default_out
    results_dir = args.out / f"seed-{args.seed}"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in [] if args.report_only else args.only or CONFIGS:
        path = results_dir / f"{name}.json"
        if args.remeasure_prefill:
            if path.exists():
                remeasure_prefill(name, path, args)
            continue
        if path.exists():
            print(f"{name}: done already ({path})")
            continue
        print(f"{name}: training {args.steps} steps ...", flush=True)
        result = run_config(name, args)
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: accuracy {result['test']['accuracy']:.3f}, {result['train_seconds']:.0f} s", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    steps = {row["steps"] for row in results}  # what the rows were trained with (also under --report-only)
    steps = steps.pop() if len(steps) == 1 else args.steps
    # the command that regenerates every row (rows are resumable; each JSON records its own settings)
    command = " ".join(["python benchmarks/accuracy_at_budget.py"] + [
        f"--{flag} {value}" for flag, value, default in (
            ("task", args.task, "easy-vqa"), ("steps", steps, 300), ("seed", args.seed, 0),
            ("out", display_path(args.out), display_path(default_out))) if value != default])
    print(write_report(results, args.out, command, args.task, args.seed).read_text())


if __name__ == "__main__":
    main()
