"""`leo-mini` command line: argument parsing and dispatch (demo, eval, serve, space, build, convert, export, push,
train)."""

import argparse
import json
import sys
import time

from safetensors import SafetensorError


def parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs → config overrides; values are JSON where they parse, else strings. The builders
    refuse names that are not `LeoMiniConfig` options, and the config checks each value's type and range."""
    overrides = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set takes KEY=VALUE, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def run_demo(args: argparse.Namespace) -> None:
    from .demo import run_random_demo, run_trained_demo

    if args.preset == "tiny":
        run_random_demo(args.preset, args.seed, args.max_new_tokens, args.num_visual_tokens)
    else:
        run_trained_demo(args.model, args.image, args.question, args.max_new_tokens, args.num_visual_tokens)


def run_eval(args: argparse.Namespace) -> None:
    from .easyvqa.evaluation import evaluate_checkpoint

    evaluate_checkpoint(args.model, args.dataset, args.split, limit=args.limit, seed=args.seed,
                        batch_size=args.batch_size, swap_images=args.swap_images,
                        num_visual_tokens=args.num_visual_tokens, output=args.output)


def run_serve(args: argparse.Namespace) -> None:
    from .app.serve import serve

    serve(args.model, args.host, args.port, args.max_new_tokens)


def run_space(args: argparse.Namespace) -> None:
    from .app.serve import write_space

    print(f"wrote {write_space(args.out, args.model, bundle=args.bundle)}: a Gradio Space for {args.model}")


def run_build(args: argparse.Namespace) -> None:
    from .conversion.build import build_checkpoint

    overrides = parse_overrides(args.set)
    if args.image_size:
        overrides["image_size"] = args.image_size
    started = time.perf_counter()
    build_checkpoint(args.out, preset=args.preset, random_init=args.random_init, llm=args.llm,
                     vision_expert_dirs=args.vision_expert, seed=args.seed, overrides=overrides)
    print(f"wrote {args.out} ({time.perf_counter() - started:.1f} s)")


def run_convert(args: argparse.Namespace) -> None:
    from .conversion.build import convert_checkpoint

    convert_checkpoint(args.source, args.src, args.out, token_reduction=args.token_reduction,
                       **parse_overrides(args.set))
    print(f"wrote {args.out}")


def run_export(args: argparse.Namespace) -> None:
    from .hub.export import export_checkpoint

    started = time.perf_counter()
    export_checkpoint(args.model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                      repo_id=args.repo_id, license_name=args.license, base_models=args.base_model,
                      datasets=args.dataset, eval_result_files=args.eval_results)
    print(f"exported and verified {args.out} ({time.perf_counter() - started:.1f} s)")


def run_push(args: argparse.Namespace) -> None:
    from .hub.push import PushError, push_folder

    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision)
    except (PushError, ValueError) as error:
        raise SystemExit(f"leo-mini push: {error}")
    print(f"pushed {args.folder} to {url}")


def run_train(args: argparse.Namespace, extra: list[str]) -> None:
    from .training.run import run_training

    run_training(extra)


def main(argv: list[str] | None = None) -> None:
    from .easyvqa.registry import EVALUATION_DATASETS

    parser = argparse.ArgumentParser(prog="leo-mini", description="LEO-MINI multimodal LLM tools")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run LEO-MINI end to end on its embedded default")
    demo.add_argument("--preset", default="leo-mini-smol", help="leo-mini-smol (trained) or tiny (random)")
    demo.add_argument("--model", help="use this checkpoint folder instead of building the demo one")
    demo.add_argument("--image", help="your own image file")
    demo.add_argument("--question", help="your question about --image")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--num-visual-tokens", type=int, help="an elastic model's visual-token budget (default: largest)")
    demo.set_defaults(handler=run_demo)

    evaluate = commands.add_parser("eval", help="exact-match accuracy per question type (JSON + table)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--dataset", default="easy-vqa", choices=list(EVALUATION_DATASETS))
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--limit", type=int, help="seeded sample of N questions (mosaics: N questions, default 400)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--swap-images", action="store_true",
                          help="control: show each question another sample's image (what the question alone gives)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--num-visual-tokens", type=int,
                          help="an elastic model's visual-token budget per image (default: its largest)")
    evaluate.add_argument("--output", metavar="FILE",
                          help="also write the result as JSON (for `leo-mini export --eval-results`)")
    evaluate.set_defaults(handler=run_eval)

    serve = commands.add_parser("serve", help="the web demo (Gradio): ask about an image, see where CoTR looked")
    serve.add_argument("--model", help="a LEO-MINI checkpoint folder (default: LEO-MINI-Smol, assembled offline)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7860)
    serve.add_argument("--max-new-tokens", type=int, default=32)
    serve.set_defaults(handler=run_serve)

    space = commands.add_parser("space", help="write a folder that runs the web demo as a Hugging Face Space")
    space.add_argument("--out", required=True)
    space.add_argument("--model", required=True,
                       help="Hub repo id (ORG/NAME), or a local checkpoint folder with --bundle")
    space.add_argument("--bundle", action="store_true",
                       help="copy the local --model folder into the Space (its weights go through Git LFS)")
    space.set_defaults(handler=run_space)

    build = commands.add_parser("build", help="write a complete LEO-MINI checkpoint folder")
    build.add_argument("--preset", default="tiny", help="tiny (with --random-init) or leo-mini-smol")
    build.add_argument("--random-init", action="store_true", help="random weights (offline, seconds for 'tiny')")
    build.add_argument("--llm", help="a transformers causal LM folder")
    build.add_argument("--vision-expert", action="append", help="a transformers vision model folder (repeatable)")
    build.add_argument("--image-size", type=int, help="canonical input side (default: largest expert input)")
    build.add_argument("--set", action="append", metavar="KEY=VALUE", help="any LeoMiniConfig option (repeatable)")
    build.add_argument("--out", required=True)
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(handler=run_build)

    convert = commands.add_parser("convert", help="convert existing weights")
    convert.add_argument("source", choices=["llava", "gguf", "mobilenet-v2"])
    convert.add_argument("--src", required=True, help="LLaVA folder, .gguf file, or torchvision .pth file")
    convert.add_argument("--out", required=True)
    convert.add_argument("--token-reduction", default="none", choices=["none", "cotr"], help="llava only")
    convert.add_argument("--set", action="append", metavar="KEY=VALUE", help="llava only: LeoMiniConfig options")
    convert.set_defaults(handler=run_convert)

    export = commands.add_parser("export", help="write a verified Hub-ready folder with a model card")
    export.add_argument("--model", required=True)
    export.add_argument("--out", required=True)
    export.add_argument("--max-shard-size", default="5GB")
    export.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    export.add_argument("--repo-id", help="used in the model card's usage snippet")
    export.add_argument("--license", default="apache-2.0")
    export.add_argument("--base-model", action="append", help="model-card base_model entry (repeatable)")
    export.add_argument("--dataset", action="append", help="model-card datasets entry (repeatable)")
    export.add_argument("--eval-results", action="append", metavar="FILE",
                        help="a result file of `leo-mini eval --output`, written as the card's model-index (repeatable)")
    export.set_defaults(handler=run_export)

    push = commands.add_parser("push", help="upload a folder to the Hub (token from HF_TOKEN or `hf auth login`)")
    push.add_argument("--folder", required=True)
    push.add_argument("--repo-id", required=True)
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision")
    push.set_defaults(handler=run_push)

    train = commands.add_parser("train", help="fine-tune with the HF Trainer (all TrainingArguments flags work)",
                                add_help=False)
    train.set_defaults(handler=run_train)

    args, extra = parser.parse_known_args(argv)
    try:
        if args.handler is run_train:
            run_train(args, extra)
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        else:
            args.handler(args)
    except (OSError, TypeError, ValueError) as error:  # bad input or a failed write: one line, no traceback
        print(f"leo-mini {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2)
    except SafetensorError as error:  # e.g. the disk filled up while the weights were written
        print(f"leo-mini {args.command}: writing the weights failed: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
