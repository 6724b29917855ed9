"""Can CoTR's scores steer to the mosaic cell a question names at all? CoTR trained alone, with that as its objective.

End-to-end mosaic training (accuracy_at_budget.py --task mosaic) left CoTR's attention question-independent
(cotr_cell_attention.py). This separates "the scores cannot express it" from "the end-to-end signal is too weak to
find it": a fresh CoTR sees the real expert's features of 2×2 train mosaics (ImageNet MobileNetV2, 196 tokens) and
the real LLM's prompt text sums for "What colour is the shape in the <cell>?", and is trained directly to put its
attention (mean over the N_V queries) on the named cell: loss = −log(share on the named cell). Steering is then
measured on test mosaics exactly as cotr_cell_attention.py does, during training.

    python benchmarks/cotr_steering_probe.py
"""

import argparse
import copy
import shlex
import sys
import time
from pathlib import Path

import torch

from common import CONFIGS, ROOT, cell_questions, cell_share, steering_of, token_cells, write_results
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.mosaic import EasyVQAMosaicDataset
from leo_mini_hf.modeling.token_reduction import ConditionalTokenReduction

GRID = 2


@torch.no_grad()
def mosaic_features(model, processor, split: str, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen expert's tokens for `size` mosaics, (size, N, d), and the cell questions' text sums (cells, d_text)
    (the same for every mosaic: only the image differs between prompts)."""
    mosaics = EasyVQAMosaicDataset(split, GRID, size=size, seed=seed)
    features, text_sum = [], None
    for index in range(len(mosaics)):
        pixel_values, text_sum = cell_questions(model, processor, mosaics[index]["messages"][0]["content"][0]["image"],
                                                GRID)
        features.append(model.vision_experts[0](pixel_values)[0])
    return torch.stack(features), text_sum


def named_cell_shares(reducer, features: torch.Tensor, text_sum: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """(mosaics, cells asked, cells measured): attention share, every cell of every mosaic asked."""
    num_mosaics, num_cells = len(features), len(text_sum)
    weights = reducer.expert_attention([features.repeat_interleave(num_cells, 0)], text_sum.repeat(num_mosaics, 1))[0]
    return cell_share(weights, cells, GRID).view(num_mosaics, num_cells, GRID**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", default=["cotr-16-pos", "cotr-16-pos-cos"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-mosaics", type=int, default=256)
    parser.add_argument("--test-mosaics", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--parts", type=Path, default=ROOT / "benchmarks" / ".work" / "parts")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cotr_steering_probe" / "cotr_steering_probe")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, processor = assemble_leo_mini_smol(args.parts, **CONFIGS["cotr-16"])
    model.eval()
    started = time.perf_counter()
    train_features, text_sum = mosaic_features(model, processor, "train", args.train_mosaics, args.seed)
    test_features, _ = mosaic_features(model, processor, "test", args.test_mosaics, args.seed)
    print(f"expert features: {time.perf_counter() - started:.0f} s", flush=True)
    cells = token_cells(model.vision_experts[0].num_tokens, GRID)
    num_cells = len(text_sum)
    results = []
    for name in args.only:
        config = copy.deepcopy(model.config)
        for key, value in CONFIGS[name].items():
            setattr(config, key, value)
        if config.token_reduction != "cotr":
            raise ValueError(f"{name} has no CoTR (token_reduction={config.token_reduction!r})")
        torch.manual_seed(args.seed)
        reducer = ConditionalTokenReduction(config, [train_features.shape[-1]], [train_features.shape[1]])
        optimizer = torch.optim.Adam(reducer.parameters(), lr=args.learning_rate)
        curve, started = [], time.perf_counter()
        for step in range(args.steps + 1):
            if step % max(1, args.steps // 6) == 0 or step == args.steps:
                with torch.no_grad():
                    curve.append({"step": step, **steering_of(named_cell_shares(reducer, test_features, text_sum,
                                                                                cells))})
                print(f"{name} step {step}: {curve[-1]}", flush=True)
            if step == args.steps:
                break
            mosaic = torch.randint(len(train_features), (args.batch_size,))
            cell = torch.randint(num_cells, (args.batch_size,))
            weights = reducer.expert_attention([train_features[mosaic]], text_sum[cell])[0]  # (B, N_V, N)
            share = cell_share(weights, cells, GRID).gather(1, cell[:, None])  # on the named cell: (B, 1)
            loss = -share.clamp(min=1e-12).log().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        results.append({"name": name, "config": CONFIGS[name], "curve": curve,
                        "train_seconds": time.perf_counter() - started})
    command = shlex.join(["python", "benchmarks/cotr_steering_probe.py", *sys.argv[1:]])
    lines = ["# CoTR trained alone to look where the question says (2×2 easy-vqa mosaics)", "",
             f"Command: `{command}`  ",
             f"A fresh CoTR on the frozen expert's features of {args.train_mosaics} train mosaics and the LLM's prompt "
             f"text sums, objective −log(attention share on the named cell), Adam lr {args.learning_rate}, batch "
             f"{args.batch_size}; measured on {args.test_mosaics} test mosaics, every cell asked (uniform share 0.25). "
             "Steering = share on the cell when it is asked − when another cell is asked (± standard error).", "",
             "| configuration | step | share on the named cell | share when another cell is asked | steering | "
             "largest cell share |", "|---" * 6 + "|"]
    for row in results:
        for point in row["curve"]:
            lines.append(f"| {row['name']} | {point['step']} | {point['named_cell_share']:.3f} | "
                         f"{point['share_when_other_cell_asked']:.3f} | "
                         f"{point['steering']:+.3f} ± {point['steering_std_error']:.3f} | "
                         f"{point['largest_cell_share']:.3f} |")
    write_results(args.out, {"command": command, "results": results}, lines)


if __name__ == "__main__":
    main()
