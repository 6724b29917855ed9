"""Accuracy at a visual-token budget on easy-vqa: LEO-MINI-Smol with CoTR vs text-agnostic reducers vs full tokens.

Same LLM (SmolLM2-135M-Instruct), same expert (ImageNet MobileNetV2 at 448 px, 196 tokens), same data, steps and
seeds; only the visual-token path differs. Stage-3 recipe: CoTR/pooling + projector + MMoE train, LLM and expert
frozen. Resumable: each configuration's result is a JSON file, skipped when present.

    python benchmarks/accuracy_at_budget.py            # all configurations, then the table and plot
    python benchmarks/accuracy_at_budget.py --only cotr-16 --save-demo-weights
"""

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from leo_mini_hf.conversion.smol import assemble_leo_mini_smol  # noqa: E402
from leo_mini_hf.evaluation import evaluate_vqa, prefill_seconds  # noqa: E402
from leo_mini_hf.training.collator import LeoMiniDataCollator  # noqa: E402
from leo_mini_hf.training.data import EasyVQADataset  # noqa: E402
from leo_mini_hf.training.stages import apply_training_stage  # noqa: E402
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments  # noqa: E402

CONFIGS = {
    "cotr-16": {"num_visual_tokens": 16},
    "cotr-64": {"num_visual_tokens": 64},
    "cotr-4": {"num_visual_tokens": 4},
    "avgpool-16": {"token_reduction": "avg_pool", "num_visual_tokens": 16},
    "queries-16": {"num_visual_tokens": 16, "cotr_text_conditioning": False},
    "cotr-16-no-mmoe": {"num_visual_tokens": 16, "mmoe_num_experts": 0},
    "cotr-16-sum": {"num_visual_tokens": 16, "cotr_pooling": "sum"},
    "avgpool-64": {"token_reduction": "avg_pool", "num_visual_tokens": 64},
    "avgpool-4": {"token_reduction": "avg_pool", "num_visual_tokens": 4},
    "queries-64": {"num_visual_tokens": 64, "cotr_text_conditioning": False},
    "queries-4": {"num_visual_tokens": 4, "cotr_text_conditioning": False},
    "full-196": {"token_reduction": "none"},
}
VARIANT = {"no-mmoe": ", general LoRA only (no routed experts)", "sum": ", summed pooled terms (cotr_pooling='sum')"}
METHOD = {"cotr": "CoTR (text-conditioned)", "avgpool": "average pooling", "queries": "learned queries, no text",
          "full": "full tokens (LLaVA-style)"}


def run_config(name: str, args) -> dict:
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", **CONFIGS[name])
    apply_training_stage(model, "finetune")
    train_set = EasyVQADataset("train")
    training = default_training_arguments(
        output_dir=str(args.work_dir / "runs" / name), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 20), save_strategy="no", seed=args.seed,
        data_seed=args.seed, use_cpu=True, disable_tqdm=True,
    )
    trainer = LeoMiniTrainer(model=model, args=training, train_dataset=train_set,
                             data_collator=LeoMiniDataCollator(processor), processing_class=processor)
    started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - started
    test_set = EasyVQADataset("test")
    evaluation = evaluate_vqa(model, processor, test_set, limit=args.eval_limit, batch_size=16, seed=args.seed)
    swapped = evaluate_vqa(model, processor, test_set, limit=args.eval_limit, batch_size=16, seed=args.seed,
                           swap_images=True)
    result = {
        "name": name,
        "overrides": CONFIGS[name],
        "visual_tokens": model.config.num_image_tokens,
        "expert_tokens": model.model.vision_experts[0].num_tokens,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": round(train_seconds / args.steps, 3),
        "loss_curve": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "aux_loss_curve": [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log],
        "test": evaluation,
        "test_images_swapped": swapped,
        "prefill_seconds": prefill_seconds(model, processor, test_set[0]),
    }
    save_trained_weights(model, args.work_dir / "runs" / name / "trained.safetensors", result)  # to re-evaluate
    if args.save_demo_weights and name == args.demo_config:
        save_trained_weights(model, ROOT / "src" / "leo_mini_hf" / "assets" / "leo-mini-smol-easyvqa.safetensors",
                             result)
    return result


def save_trained_weights(model, path: Path, result: dict) -> None:
    from leo_mini_hf.demo import save_adapter_weights

    save_adapter_weights(model, path, metadata={"config": json.dumps(CONFIGS[result["name"]]),
                                                "steps": str(result["steps"]), "seed": str(result["seed"]),
                                                "test_accuracy": f"{result['test']['accuracy']:.4f}"})


def write_report(results: list[dict], out: Path, command: str) -> None:
    rows = sorted(results, key=lambda r: (r["name"].split("-")[0], -r["visual_tokens"]))
    lines = ["| configuration | method | visual tokens | test accuracy | shape | colour | yes/no | prefill (ms) | "
             "train s/step |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per_type = r["test"]["per_type"]
        method = METHOD[r["name"].split("-")[0]] + VARIANT.get(r["name"].split("-", 2)[-1], "")
        lines.append(f"| {r['name']} | {method} | {r['visual_tokens']} | {r['test']['accuracy']:.3f} | "
                     f"{per_type.get('shape', 0):.3f} | {per_type.get('colour', 0):.3f} | {per_type.get('yes/no', 0):.3f} | "
                     f"{1000 * r['prefill_seconds']:.0f} | {r['seconds_per_step']:.2f} |")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    header = (f"# Accuracy at budget: easy-vqa test ({rows[0]['test']['count']} questions, seeded sample)\n\n"
              f"Command: `{command}`  \nMachine: {machine}  \nSteps {rows[0]['steps']}, batch {rows[0]['batch_size']}, "
              f"lr {rows[0]['learning_rate']}, seed {rows[0]['seed']}; expert tokens per image: "
              f"{rows[0]['expert_tokens']}.\n\n")
    (out / "accuracy_at_budget.md").write_text(header + "\n".join(lines) + "\n")
    (out / "accuracy_at_budget.json").write_text(json.dumps({"command": command, "machine": machine,
                                                             "results": rows}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for method in ("cotr", "avgpool", "queries", "full"):
        points = sorted((r["visual_tokens"], r["test"]["accuracy"]) for r in rows
                        if r["name"].split("-")[0] == method and r["name"].count("-") == 1)
        if points:
            axis.plot(*zip(*points), marker="o", label=METHOD[method])
    markers = {"no-mmoe": ("x", "CoTR, general LoRA only"), "sum": ("s", "CoTR, summed pooled terms")}
    for r in rows:
        variant = r["name"].split("-", 2)[-1]
        if r["name"].count("-") == 2 and variant in markers:
            axis.scatter([r["visual_tokens"]], [r["test"]["accuracy"]], marker=markers[variant][0], color="black",
                         label=markers[variant][1], zorder=3)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("visual tokens per image in the LLM")
    axis.set_ylabel("easy-vqa test accuracy (exact match)")
    axis.set_title("LEO-MINI-Smol: accuracy at a visual-token budget")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / "accuracy_at_budget.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--eval-limit", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--save-demo-weights", action="store_true", help="ship the demo configuration's weights")
    parser.add_argument("--demo-config", default="cotr-16")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results_dir = args.out / "accuracy_at_budget"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in args.only or CONFIGS:
        path = results_dir / f"{name}.json"
        if path.exists():
            print(f"{name}: done already ({path})")
            continue
        print(f"{name}: training {args.steps} steps ...", flush=True)
        result = run_config(name, args)
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: accuracy {result['test']['accuracy']:.3f}, {result['train_seconds']:.0f} s", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    command = "python benchmarks/accuracy_at_budget.py " + " ".join(sys.argv[1:])
    write_report(results, args.out, command.strip())
    print((args.out / "accuracy_at_budget.md").read_text())


if __name__ == "__main__":
    main()
