"""`leo-mini` command line."""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .modeling import LeoMiniConfig, LeoMiniForConditionalGeneration


def run_demo(args: argparse.Namespace) -> None:
    """Build a random model from a preset and run one image + prompt through `generate`."""
    torch.manual_seed(args.seed)
    config = LeoMiniConfig.from_preset(args.preset)
    started = time.perf_counter()
    model = LeoMiniForConditionalGeneration(config).eval()
    print(f"built random '{args.preset}' LEO-MINI in {time.perf_counter() - started:.2f} s "
          f"({sum(p.numel() for p in model.parameters()):,} parameters)")

    experts = model.model.vision_experts
    for index, expert in enumerate(experts):
        print(f"  expert {index}: {type(expert.model).__name__:<24} {expert.num_tokens:>5} tokens x {expert.hidden_size}")
    tokens_before = sum(expert.num_tokens for expert in experts)
    print(f"visual tokens per image: {tokens_before} from the experts -> {config.num_image_tokens} after "
          f"{'CoTR' if config.token_reduction == 'cotr' else 'no reduction'}")

    image = torch.randn(1, 3, config.image_size, config.image_size)
    prompt = [config.text_config.bos_token_id or 0] + [config.image_token_id] * config.num_image_tokens + [10, 11, 12]
    input_ids = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():
        generated = model.generate(input_ids=input_ids, pixel_values=image, max_new_tokens=args.max_new_tokens,
                                   do_sample=False)
    print(f"generated token ids (random weights): {generated[0, input_ids.shape[1]:].tolist()} "
          f"in {time.perf_counter() - started:.2f} s")


def run_build(args: argparse.Namespace) -> None:
    """Write a complete checkpoint folder. It is built in a temporary sibling and moved into place at the end, so
    a failure never leaves a half-written folder, and an existing non-empty folder is never overwritten."""
    from .conversion.build import build_random_checkpoint

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"leo-mini build: {out} exists and is not empty; choose a new --out")
    if not args.random_init:
        raise SystemExit("leo-mini build: pass --random-init (building from pretrained parts is not available yet)")
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_random_checkpoint(args.preset, staging, seed=args.seed)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"wrote {out} ({time.perf_counter() - started:.1f} s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="leo-mini", description="LEO-MINI multimodal LLM tools")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run LEO-MINI end to end on its embedded default")
    demo.add_argument("--preset", default="tiny")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)

    build = commands.add_parser("build", help="write a complete LEO-MINI checkpoint folder")
    build.add_argument("--preset", default="tiny")
    build.add_argument("--random-init", action="store_true", help="random weights (offline, seconds for 'tiny')")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=run_build)

    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
