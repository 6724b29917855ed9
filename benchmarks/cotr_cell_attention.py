"""Does the question steer CoTR to the cell it names? Attention on easy-vqa mosaics, for trained mosaic models.

For each test mosaic and each of its cells c, the model is asked "What colour is the shape in the <c>?" and we
measure CoTR's attention share on c: the softmax weights averaged over the N_V queries, summed over the expert
tokens whose centre lies in c (uniform attention gives c its token share, 1/4 or about 1/9). Then

    steering = share on c when c is asked − share on c when another cell is asked

averaged over cells and mosaics. Positive steering means the text moves the reduction to the named cell (what the
paper claims conditioning buys); text-free learned queries have exactly 0 (their scores ignore the text).

    python benchmarks/cotr_cell_attention.py      # trained weights of the 1500-step mosaic rows (accuracy_at_budget)
    python benchmarks/cotr_cell_attention.py --only cotr-16-pos-cos --mosaics 20   # a row still training: its last
                                                  # complete checkpoint (quick look, before spending the whole run)
"""

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import torch

from common import (CONFIGS, ROOT, cell_questions, cell_share, display_path, load_trained_weights,
                    steering_of, token_cells, write_results)
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.mosaic import EasyVQAMosaicDataset
from leo_mini_hf.modeling.token_reduction import ConditionalTokenReduction


@torch.no_grad()
def cell_shares(model, processor, image, mosaic_grid: int) -> tuple[torch.Tensor, dict]:
    """(cells asked, cells measured): CoTR's attention share on each cell when each cell is named in the question;
    and spreads of the attention logits log α (centred per query): over tokens (how peaked the scores are) and over
    the questions (all that the text moves: every other score term is the same for one image)."""
    pixel_values, text_sum = cell_questions(model, processor, image, mosaic_grid)
    _, weights = model.get_image_features(pixel_values.expand(len(text_sum), -1, -1, -1), text_sum,
                                          output_reduction_weights=True)
    weights = weights[0]  # first expert: (cells, N_V, N)
    expert = model.vision_experts[0]
    cells = token_cells(expert.num_tokens, mosaic_grid)
    log_weights = weights.clamp(min=1e-30).log()
    logits = log_weights - log_weights.mean(dim=-1, keepdim=True)
    spreads = {
        "relative_entropy": (-(weights * log_weights).sum(dim=-1)
                             / math.log(weights.shape[-1])).mean().item(),  # 1: uniform over the tokens
        "logit_spread_over_tokens": logits.std(dim=-1).mean().item(),
        "logit_spread_over_questions": logits.std(dim=0).mean().item(),
    }
    return cell_share(weights, cells, mosaic_grid), spreads  # (cells asked, cells measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", type=Path, default=ROOT / "benchmarks/.work/runs/mosaic/mosaic-1500",
                        help="where accuracy_at_budget.py left each row's trained.safetensors (or, while the row "
                             "trains, its checkpoints)")
    parser.add_argument("--only", nargs="*", default=["cotr-16", "cotr-16-pos", "cotr-16-pos-cos"],
                        help="rows to measure; rows measured before are kept in the report")
    parser.add_argument("--mosaics", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parts", type=Path, default=ROOT / "benchmarks" / ".work" / "parts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cotr_cell_attention" / "cotr_cell_attention")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/cotr_cell_attention.py", *sys.argv[1:]])
    results = []
    for name in args.only:
        model, processor = assemble_leo_mini_smol(args.parts, **CONFIGS[name])
        if not isinstance(model.token_reducer, ConditionalTokenReduction):
            raise ValueError(f"{name} has no CoTR (token_reduction={model.config.token_reduction!r})")
        weights_path = load_trained_weights(model, args.runs_dir / name)
        if weights_path is None:
            print(f"{name}: no trained weights or checkpoint in {args.runs_dir / name}; skipped")
            continue
        model.eval()
        row = {"name": name, "weights": display_path(weights_path), "command": command}
        for grid in (2, 3):
            mosaics = EasyVQAMosaicDataset("test", grid, size=args.mosaics, seed=args.seed)
            measured = [cell_shares(model, processor, mosaics[i]["messages"][0]["content"][0]["image"], grid)
                        for i in range(len(mosaics))]
            shares = torch.stack([share for share, _ in measured])
            spreads = {key: sum(spread[key] for _, spread in measured) / len(measured) for key in measured[0][1]}
            token_share = torch.bincount(token_cells(model.vision_experts[0].num_tokens, grid)).float()
            row[f"{grid}x{grid}"] = {**steering_of(shares), **spreads,
                                     "uniform_share": (token_share / token_share.sum()).mean().item(),
                                     "mosaics": mosaics.description()}
            print(f"{name} {grid}x{grid}: {row[f'{grid}x{grid}']}", flush=True)
        results.append(row)
    write_report(results, args.out)


def write_report(new_rows: list[dict], out: Path) -> None:
    """Markdown + JSON of every row measured so far: rows measured now replace earlier ones of the same name, so a
    row can be added without re-measuring the others; each row keeps the command that measured it."""
    earlier = []
    if out.with_suffix(".json").exists():
        saved = json.loads(out.with_suffix(".json").read_text())
        earlier = [{"command": saved.get("command"), **row} for row in saved["results"]]  # older rows: file-wide command
    measured = {row["name"] for row in new_rows}
    order = list(CONFIGS)
    results = sorted([row for row in earlier if row["name"] not in measured] + new_rows,
                     key=lambda row: order.index(row["name"]))
    commands = list(dict.fromkeys(row["command"] for row in results))
    lines = ["# Does the question steer CoTR to the cell it names? (easy-vqa test mosaics)", "",
             "Commands (each row keeps the one that measured it): " + ", ".join(f"`{c}`" for c in commands) + "  ",
             "Test mosaics per grid as the mosaics column says, every cell asked \"What colour is the "
             "shape in the <cell>?\"; share = CoTR attention (mean over queries) on the tokens inside the cell; "
             "steering = share on the cell when it is asked − when another cell is asked (± standard error over "
             "mosaics); largest cell share: how concentrated the reduction is at all; query entropy: mean entropy of "
             "each query's softmax relative to uniform over the expert's tokens (1 = uniform); logit spread: standard "
             "deviation of the attention logits (centred per query) over the tokens, and over the questions — the "
             "latter is everything the text moves, since every other score term is the same for one image.", "",
             "| configuration | grid | mosaics | share on the named cell | share when another cell is asked | "
             "steering | uniform share | largest cell share | query entropy | logit spread: tokens / questions |",
             "|---" * 10 + "|"]
    for row in results:
        for grid in ("2x2", "3x3"):
            r = row[grid]
            weights = Path(row["weights"])
            label = row["name"] if weights.name == "trained.safetensors" else f"{row['name']} ({weights.parent.name})"
            lines.append(f"| {label} | {grid} | {r['mosaics']['size']} | {r['named_cell_share']:.4f} | "
                         f"{r['share_when_other_cell_asked']:.4f} | "
                         f"{r['steering']:+.4f} ± {r['steering_std_error']:.4f} | "
                         f"{r['uniform_share']:.4f} | "
                         f"{r['largest_cell_share']:.4f} | {r['relative_entropy']:.3f} | "
                         f"{r['logit_spread_over_tokens']:.2f} / {r['logit_spread_over_questions']:.4f} |")
    write_results(out, {"results": results}, lines)


if __name__ == "__main__":
    main()
