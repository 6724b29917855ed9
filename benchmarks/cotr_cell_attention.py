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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from accuracy_at_budget import CONFIGS, TrainingTimer, display_path  # noqa: E402
from safetensors import safe_open  # noqa: E402

from leo_mini_hf.conversion.smol import assemble_leo_mini_smol  # noqa: E402
from leo_mini_hf.demo import is_trained_part, load_adapter_weights  # noqa: E402
from leo_mini_hf.training.mosaic import CELL_NAMES, EasyVQAMosaicDataset  # noqa: E402


def token_cells(grid_side: int, mosaic_grid: int) -> torch.Tensor:
    """(grid_side²,) the mosaic cell (row-major) holding each expert token's centre; tokens are row-major too."""
    centres = ((torch.arange(grid_side) + 0.5) * mosaic_grid / grid_side).floor().long()
    return (centres[:, None] * mosaic_grid + centres[None, :]).flatten()


def cell_share(weights: torch.Tensor, cells: torch.Tensor, mosaic_grid: int) -> torch.Tensor:
    """CoTR weights (n, N_V, N) → attention share of each mosaic cell (n, cells): mean over the queries, summed over
    the tokens of the cell (`cells`: token_cells)."""
    per_token = weights.mean(dim=1)
    return torch.zeros(len(per_token), mosaic_grid**2, dtype=per_token.dtype).index_add(1, cells, per_token)


@torch.no_grad()
def cell_questions(model, processor, image, mosaic_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """"What colour is the shape in the <cell>?" for every cell of one mosaic: its pixel_values (1, 3, S, S) and
    the prompt text sums CoTR is conditioned on, (cells, d) in CELL_NAMES order."""
    conversations = [[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": f"What colour is the shape in the {cell}?"}]}]
        for cell in CELL_NAMES[mosaic_grid]]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    text_mask = model.model.text_condition_mask(inputs["input_ids"], inputs["attention_mask"], None)
    text_sum = (embeds * text_mask.unsqueeze(-1).to(embeds.dtype)).sum(dim=1)  # as in the model's forward
    return inputs["pixel_values"][:1], text_sum  # the same mosaic in every prompt: one picture


@torch.no_grad()
def cell_shares(model, processor, image, mosaic_grid: int) -> tuple[torch.Tensor, dict]:
    """(cells asked, cells measured): CoTR's attention share on each cell when each cell is named in the question;
    and spreads of the attention logits log α (centred per query): over tokens (how peaked the scores are) and over
    the questions (all that the text moves: every other score term is the same for one image)."""
    pixel_values, text_sum = cell_questions(model, processor, image, mosaic_grid)
    inner = model.model
    features = [expert(pixel_values).expand(len(text_sum), -1, -1) for expert in inner.vision_experts]
    weights = inner.token_reducer.expert_attention(features, text_sum)[0]  # first expert: (cells, N_V, N)
    expert = inner.vision_experts[0]
    cells = token_cells(expert.grid_size, mosaic_grid)
    log_weights = weights.clamp(min=1e-30).log()
    logits = log_weights - log_weights.mean(dim=-1, keepdim=True)
    spreads = {
        "relative_entropy": (-(weights * log_weights).sum(dim=-1)
                             / math.log(weights.shape[-1])).mean().item(),  # 1: uniform over the tokens
        "logit_spread_over_tokens": logits.std(dim=-1).mean().item(),
        "logit_spread_over_questions": logits.std(dim=0).mean().item(),
    }
    return cell_share(weights, cells, mosaic_grid), spreads  # (cells asked, cells measured)


def steering_of(shares: torch.Tensor) -> dict:
    """shares (mosaics, cells asked, cells measured) → named-cell share, other-question share, steering, and the
    share of the most-attended cell (how concentrated the reduction is at all)."""
    cells = shares.shape[-1]
    named = torch.diagonal(shares, dim1=1, dim2=2)  # (mosaics, cells)
    others = (shares.sum(dim=1) - named) / (cells - 1)  # share on c when another cell is asked
    steering_per_mosaic = (named - others).mean(dim=1)
    return {"named_cell_share": named.mean().item(), "share_when_other_cell_asked": others.mean().item(),
            "largest_cell_share": shares.amax(dim=-1).mean().item(), "steering": steering_per_mosaic.mean().item(),
            "steering_std_error": (steering_per_mosaic.std() / len(shares) ** 0.5).item()}


def load_trained_weights(model, run_dir: Path) -> Path | None:
    """A finished row's trained.safetensors, else the trained parts of its last complete Trainer checkpoint (a row
    still training); returns the file loaded, or None when there is neither."""
    if (run_dir / "trained.safetensors").exists():
        load_adapter_weights(model, run_dir / "trained.safetensors")
        return run_dir / "trained.safetensors"
    checkpoint = TrainingTimer.last_complete_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        return None
    path = checkpoint / "model.safetensors"
    trained = {name for name in model.state_dict() if is_trained_part(name)}
    with safe_open(str(path), framework="pt") as handle:
        missing = sorted(trained - set(handle.keys()))
        if missing:
            raise ValueError(f"{path} does not hold every trained part of the model, e.g. {missing[:3]}")
        model.load_state_dict({name: handle.get_tensor(name) for name in trained}, strict=False)
    return path


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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cotr_cell_attention")
    args = parser.parse_args()
    command = shlex.join(["python", "benchmarks/cotr_cell_attention.py", *sys.argv[1:]])
    results = []
    for name in args.only:
        model, processor = assemble_leo_mini_smol(args.parts, **CONFIGS[name])
        if model.model.token_reducer is None:
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
            token_share = torch.bincount(token_cells(model.model.vision_experts[0].grid_size, grid)).float()
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
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
