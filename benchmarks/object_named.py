"""Does CoTR keep what the question names? LEO-MINI-Smol on object-named mosaics at 1 and 4 visual tokens.

The question names one tile of a 2×2 or 3×3 easy-vqa mosaic by its content ("What colour is the circle?", "What
shape is the red one?", "Is there a red circle?"); see `leo_mini_hf.easyvqa.object_named`. Same LLM, expert, data,
steps and seed for every row; only the visual-token path differs. Stage-3 recipe (reducer + projector + MMoE train,
LLM and expert frozen), warm-started from the shipped easy-vqa demo weights: projector and MMoE for every row, and
CoTR's projections and first k queries for CoTR rows (`-cold` rows: CoTR fresh). Parameters the demo weights lack
(cosine rows' score scales) start fresh; each result lists what started warm.

Per row: exact-match accuracy per question type with standard errors on seeded 2×2 and 3×3 test mosaics and on
easy-vqa test, the same mosaic questions with images swapped (the question-only control), and for CoTR and
learned-query rows the share of the reducer's attention on the named tile's cell against that cell's share of the
expert's tokens, measured also every `--checkpoint-steps` during training (is the reduction still moving?).
Resumable: a row's JSON is skipped when present; a row interrupted while training resumes from its last checkpoint.

    python benchmarks/object_named.py                         # every row at seed 0, then table and plot
    python benchmarks/object_named.py --seed 1 --only cotr-1 cotr-4 avgpool-1 avgpool-4
    python benchmarks/object_named.py --report-only
    python benchmarks/object_named.py --layout distinct --only cotr-1 queries-1   # results/object-named/distinct

`--layout distinct` trains and tests on `DistinctObjectMosaicDataset` instead: every mosaic holds one object of each
shape in three different colours, so no tile stands out unless the question names it (the issue's layout lets a
question-blind rule pick the named tile, `object_named_shortcut.py`).
"""

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from common import (GRIDS, OBJECT_NAMED_FOLDERS, OBJECT_NAMED_RESULTS, SHORT_TYPE_NAMES, WARM_PARTS, AttentionShareProbe,
                    TrainingTimer, accuracy_by_tokens_figure, add_object_named_arguments, display_path,
                    named_cell_shares, share_cell, train_resumably, warm_start, with_std_errors, write_results)
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.easyvqa.evaluation import evaluate_vqa, prefill_seconds
from leo_mini_hf.easyvqa.object_named import ANSWERS, LAYOUTS, named_blind_accuracy, object_named_dataset, \
    object_named_training_mix
from leo_mini_hf.modeling.token_reduction import ConditionalTokenReduction
from leo_mini_hf.training.adapter_weights import save_adapter_weights
from leo_mini_hf.training.feature_cache import VisionFeatureCache
from leo_mini_hf.training.stages import apply_training_stage

# row name → (config overrides, which demo-weight parts start warm); run in this order
ROWS = {
    "cotr-1": ({"num_visual_tokens": 1}, "reducer"),
    "avgpool-1": ({"token_reduction": "avg_pool", "num_visual_tokens": 1}, "projector+mmoe"),
    "queries-1": ({"num_visual_tokens": 1, "cotr_text_conditioning": False}, "projector+mmoe"),
    "cotr-4": ({"num_visual_tokens": 4}, "reducer"),
    "avgpool-4": ({"token_reduction": "avg_pool", "num_visual_tokens": 4}, "projector+mmoe"),
    "queries-4": ({"num_visual_tokens": 4, "cotr_text_conditioning": False}, "projector+mmoe"),
    "cotr-cos-1": ({"num_visual_tokens": 1, "cotr_score_scaling": "cosine"}, "reducer"),
    "cotr-cos-4": ({"num_visual_tokens": 4, "cotr_score_scaling": "cosine"}, "reducer"),
    "cotr-1-cold": ({"num_visual_tokens": 1}, "projector+mmoe"),
    "full-196": ({"token_reduction": "none"}, "projector+mmoe"),
    "cotr-16": ({"num_visual_tokens": 16}, "reducer"),  # the "16 if time allows"; elastic.py compares with it
    "cotr-1-lr10": ({"num_visual_tokens": 1}, "reducer"),  # CoTR's own learning rate: PART_LEARNING_RATE_FACTORS
    "cotr-1-user": ({"num_visual_tokens": 1, "cotr_text_source": "user"}, "reducer"),  # the user's words only
    # the baselines at cotr-16's budget: does CoTR's text term add anything where 16 queries keep every shape?
    "avgpool-16": ({"token_reduction": "avg_pool", "num_visual_tokens": 16}, "projector+mmoe"),
    "queries-16": ({"num_visual_tokens": 16, "cotr_text_conditioning": False}, "projector+mmoe"),
}
# row → {part: factor}: those parts train at factor × --learning-rate (a Trainer parameter group), on the same schedule
PART_LEARNING_RATE_FACTORS = {"cotr-1-lr10": {"token_reducer": 10.0}}
METHOD = {"cotr": "CoTR", "cotr-cos": "CoTR, cosine scores", "avgpool": "average pooling",
          "queries": "learned queries, no text", "full": "full tokens"}


def run_row(name: str, args) -> dict:
    overrides, warm = ROWS[name]
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", **overrides)
    warm_start_record = warm_start(model, WARM_PARTS[warm])
    apply_training_stage(model, "finetune")
    cache = VisionFeatureCache(args.feature_cache) if args.feature_cache else None
    if cache is not None:
        cache.attach(model)
    train_set, data_description = object_named_training_mix(args.seed, args.train_size, args.layout)
    run_dir = args.work_dir / "runs" / OBJECT_NAMED_FOLDERS[args.layout] / f"seed-{args.seed}" / name
    run_dir.mkdir(parents=True, exist_ok=True)
    attends = isinstance(model.token_reducer, ConditionalTokenReduction)  # CoTR or text-free queries
    probe_log = run_dir / "attention_share.jsonl"
    if TrainingTimer.last_complete_checkpoint(run_dir) is None:
        probe_log.unlink(missing_ok=True)  # a row starting over starts its log over
    callbacks = [AttentionShareProbe(model, processor, probe_log, args.probe_mosaics, layout=args.layout)
                 ] if attends else []
    part_learning_rates = {part: factor * args.learning_rate
                           for part, factor in PART_LEARNING_RATE_FACTORS.get(name, {}).items()} or None
    trainer, train_seconds = train_resumably(model, processor, train_set, run_dir, args, label=name,
                                             callbacks=callbacks, part_learning_rates=part_learning_rates)
    model.eval()
    tests = {f"object-{grid}x{grid}": object_named_dataset("test", grid, args.eval_size, args.seed, args.layout)
             for grid in GRIDS}
    result = {
        "name": name, "layout": args.layout, "overrides": overrides, "warm_start": warm_start_record,
        "visual_tokens": model.config.num_image_tokens, "expert_tokens": model.vision_experts[0].num_tokens,
        "probe_mosaics": args.probe_mosaics, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "part_learning_rates": part_learning_rates, "seed": args.seed,
        "threads": torch.get_num_threads(), "data": data_description,
        "train_seconds": round(train_seconds, 1), "seconds_per_step": round(train_seconds / args.steps, 3),
        "loss_curve": [log["loss"] for log in trainer.state.log_history if "loss" in log],
        "aux_loss_curve": [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log],
        "test_data": {set_name: dataset.description() for set_name, dataset in tests.items()},
        "test": {}, "test_images_swapped": {}, "named_cell_share": {},
    }
    for set_name, dataset in tests.items():
        result["test"][set_name] = with_std_errors(evaluate_vqa(model, processor, dataset, batch_size=16,
                                                                seed=args.seed))
        result["test_images_swapped"][set_name] = with_std_errors(evaluate_vqa(
            model, processor, dataset, batch_size=16, seed=args.seed, swap_images=True))
        if attends:
            samples = [dataset[i] for i in range(min(len(dataset), args.share_mosaics))]
            result["named_cell_share"][set_name] = named_cell_shares(model, samples, processor, dataset.grid)
    easy = EasyVQADataset("test")
    result["test"]["easy-vqa"] = with_std_errors(evaluate_vqa(model, processor, easy, limit=args.easy_vqa_limit,
                                                              batch_size=16, seed=args.seed))
    if probe_log.exists():
        result["named_cell_share_during_training"] = [json.loads(line) for line in probe_log.read_text().splitlines()]
    if cache is not None:
        result["feature_cache_stats"] = cache.stats()
        cache.detach(model)  # prefill is timed on the plain path: the expert runs, as at inference
    result["prefill_seconds"] = prefill_seconds(model, processor, tests["object-3x3"][0])
    save_adapter_weights(model, run_dir / "trained.safetensors",
                         metadata={"config": json.dumps(overrides), "steps": str(args.steps), "seed": str(args.seed)})
    return result


def family(name: str) -> str:
    """"cotr-cos-4" → "cotr-cos"; "avgpool-1" → "avgpool"."""
    return name.rsplit("-", 1)[0] if name.rsplit("-", 1)[1].isdigit() else family(name.rsplit("-", 1)[0])


def accuracy_cell(evaluation: dict, kind: str | None = None) -> str:
    if kind is None:
        return f"{evaluation['accuracy']:.3f} ± {evaluation['std_error']:.3f}"
    return f"{evaluation['per_type'][kind]:.2f} ± {evaluation['per_type_std_error'][kind]:.2f}"


def write_report(results: list[dict], out: Path, command: str) -> None:
    kinds = list(ANSWERS)
    short = SHORT_TYPE_NAMES
    rows = sorted(results, key=lambda r: (r["seed"], list(ROWS).index(r["name"])))
    first = rows[0]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    layout = first.get("layout", "unique")
    title = "# Does CoTR keep what the question names? Object-named mosaics at 1 and 4 visual tokens"
    layout_note = []
    if layout == "distinct":
        title += " (distinct layout: three objects of distinct shapes and colours, blanks elsewhere)"
        layout_note = ["", "Distinct layout: the blank cells hold nothing, so attention spread evenly over the three "
                       "objects gives the named cell a share of about 1/3 whatever the grid; only a share above that "
                       "selects the named object."]
    lines = [title, "",
             f"Command: `{command}`  ", f"Machine: {machine}  ",
             f"Trained on {first['data']['easy-vqa']['seeded_sample']} easy-vqa train questions + as many 2×2 and 3×3 "
             f"object-named train mosaics; {first['steps']} steps, batch {first['batch_size']}, lr "
             f"{first['learning_rate']}; warm start from the shipped easy-vqa demo weights (column *warm*). Test: "
             f"{first['test']['object-2x2']['count']} questions per grid (a third per type) and "
             f"{first['test']['easy-vqa']['count']} easy-vqa test questions; ± one standard error. *swapped*: the same "
             "mosaic questions, each shown another test mosaic (the question-only control). *named-cell share*: "
             "the reducer's attention (CoTR or learned queries; mean over queries) on the named tile's cell, against "
             "that cell's share of the expert's tokens. *cotr-1-lr10*: cotr-1 with CoTR at 10× the learning rate "
             "(its own parameter group); *cotr-1-user*: cotr-1 whose text term sums only the user's words "
             "(`cotr_text_source=\"user\"`).",
             *layout_note, "",
             "| row | seed | method | tokens | warm | "
             + " | ".join(f"{g}×{g} {short[k]}" for g in GRIDS for k in kinds)
             + " | swapped 2×2 / 3×3 | easy-vqa | named-cell share 2×2 | named-cell share 3×3 | train s/step |",
             "|---" * (10 + len(GRIDS) * len(kinds)) + "|"]
    chance = {"object colour of shape": 1 / 8, "object shape of colour": 1 / 3, "object colour and shape": 1 / 2}
    lines.append("| chance | – | – | – | – | " + " | ".join(f"{chance[k]:.2f}" for g in GRIDS for k in kinds)
                 + " | – | – | – | – | – |")
    blind = {grid: named_blind_accuracy(object_named_dataset(**{
        k: v for k, v in first["test_data"][f"object-{grid}x{grid}"].items() if k != "generator"},
        layout=first.get("layout", "unique"))) for grid in GRIDS}
    lines.append("| commonest colour / shape in the mosaic, \"yes\" | – | – | – | – | "
                 + " | ".join(f"{blind[g][k]:.2f}" for g in GRIDS for k in kinds) + " | – | – | – | – | – |")
    for r in rows:
        warm = "CoTR+proj+MMoE" if r["warm_start"]["warm_parts"] == sorted(WARM_PARTS["reducer"]) else "proj+MMoE"
        cells = [accuracy_cell(r["test"][f"object-{g}x{g}"], k) for g in GRIDS for k in kinds]
        swapped = " / ".join(f"{r['test_images_swapped'][f'object-{g}x{g}']['accuracy']:.2f}" for g in GRIDS)
        lines.append(f"| {r['name']} | {r['seed']} | {METHOD[family(r['name'])]} | {r['visual_tokens']} | {warm} | "
                     + " | ".join(cells) + f" | {swapped} | {accuracy_cell(r['test']['easy-vqa'])} | "
                     f"{share_cell(r, 'object-2x2')} | {share_cell(r, 'object-3x3')} | {r['seconds_per_step']:.2f} |")
    during = [r for r in rows if r.get("named_cell_share_during_training")]
    if during:
        lines += ["", "Named-cell share during training (all types; "
                  f"{during[0]['probe_mosaics']} test mosaics per grid at each checkpoint):", "",
                  "| row | seed | step | 2×2 | 3×3 |", "|---|---|---|---|---|"]
        for r in during:
            for entry in r["named_cell_share_during_training"]:
                lines.append(f"| {r['name']} | {r['seed']} | {entry['step']} | "
                             + " | ".join(share_cell({"named_cell_share": entry}, f"{g}x{g}") for g in GRIDS) + " |")
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "object_named", {"command": command, "machine": machine, "results": rows}, lines)
    plot(rows, out / "object_named.png")


def plot(rows: list[dict], path: Path) -> None:
    seeds = sorted({r["seed"] for r in rows})
    markers = {seed: "osD^v"[index % 5] for index, seed in enumerate(seeds)}  # per seed; one colour per method

    def draw(axis, grid):
        for colour, method in enumerate(METHOD):
            for seed in seeds:
                points = sorted((r["visual_tokens"], r["test"][f"object-{grid}x{grid}"]["accuracy"],
                                 r["test"][f"object-{grid}x{grid}"]["std_error"]) for r in rows
                                if family(r["name"]) == method and r["name"].rsplit("-", 1)[1].isdigit()  # no variants
                                and r["seed"] == seed)
                if points:
                    tokens, accuracies, errors = zip(*points)
                    label = METHOD[method] + (f", seed {seed}" if len(seeds) > 1 else "")
                    axis.errorbar(tokens, accuracies, yerr=errors, fmt=markers[seed], color=f"C{colour}", capsize=3,
                                  label=label)

    distinct = rows[0].get("layout") == "distinct"
    accuracy_by_tokens_figure(path, draw, legend_columns=3,
                              title="object-named mosaics, distinct layout," if distinct else "object-named mosaics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(ROWS), help="run only these rows (default: all, in order)")
    add_object_named_arguments(parser)
    parser.add_argument("--layout", choices=LAYOUTS, default="unique",
                        help="unique: the issue's mosaics (one tile of the named value, the others filled); distinct: "
                             "three objects of distinct shapes and colours, blanks elsewhere (no odd one out)")
    parser.add_argument("--out", type=Path, help="default: results/object-named/unique or results/object-named/distinct")
    args = parser.parse_args()
    args.out = args.out or OBJECT_NAMED_RESULTS[args.layout]
    torch.set_num_threads(args.threads)
    for name in [] if args.report_only else args.only or ROWS:
        path = args.out / f"seed-{args.seed}" / f"{name}.json"
        if path.exists():
            print(f"{name} (seed {args.seed}): done already ({display_path(path)})")
            continue
        print(f"{name} (seed {args.seed}): training {args.steps} steps ...", flush=True)
        result = run_row(name, args)
        result["command"] = shlex.join(["python", "benchmarks/object_named.py", *sys.argv[1:]])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"{name}: 2×2 {result['test']['object-2x2']['accuracy']:.3f}, "
              f"3×3 {result['test']['object-3x3']['accuracy']:.3f}, {result['train_seconds']:.0f} s", flush=True)
    results = [json.loads(p.read_text()) for p in sorted(args.out.glob("seed-*/*.json"))]
    if results:
        write_report(results, args.out, "python benchmarks/object_named.py [--seed S] [--only ROWS]  "
                                         "(each row's JSON keeps its exact command)")


if __name__ == "__main__":
    main()
