"""`leo-mini` command line: demo, eval, build, convert, export, push, train."""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .modeling import LeoMiniConfig, LeoMiniForConditionalGeneration


def parse_overrides(pairs: list[str]) -> dict:
    """`--set key=value` pairs → config overrides; values are JSON where they parse, else strings."""
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
    """LEO-MINI-Smol trained on easy-vqa, through `pipeline("image-text-to-text")`, on bundled or given questions."""
    if args.preset == "tiny":
        return run_random_demo(args)
    from tqdm.auto import tqdm
    from transformers import pipeline

    from .demo import DEMO_WEIGHTS, bundled_questions, demo_checkpoint, demo_metadata

    if bool(args.image) != bool(args.question):
        raise SystemExit("leo-mini demo: give --image and --question together")
    if not DEMO_WEIGHTS.is_file():
        raise SystemExit(f"leo-mini demo: the trained weights {DEMO_WEIGHTS.name} are not in this install; "
                         "run `leo-mini demo --preset tiny` for the random tiny model")
    with tqdm(total=5, desc="preparing LEO-MINI-Smol", unit="step") as progress:
        folder = Path(args.model) if args.model else demo_checkpoint(progress)
        progress.set_description("loading the pipeline")
        pipe = pipeline("image-text-to-text", model=str(folder))
        progress.update(progress.total - progress.n)
    model = pipe.model
    expert_tokens = sum(expert.num_tokens for expert in model.model.vision_experts)
    print(f"LEO-MINI-Smol ({folder}): SmolLM2-135M-Instruct + MobileNetV2, trained on easy-vqa "
          f"({demo_metadata().get('steps', '?')} steps)")
    print(f"visual tokens per image: {expert_tokens} from the expert -> {model.config.num_image_tokens} after CoTR")
    questions = [{"image": args.image, "question": args.question, "answer": None}] if args.image else bundled_questions()
    correct = 0
    for item in questions:
        chat = [{"role": "user", "content": [{"type": "image", "path": item["image"]},
                                             {"type": "text", "text": item["question"]}]}]
        started = time.perf_counter()
        output = pipe(text=chat, max_new_tokens=args.max_new_tokens, return_full_text=False,
                      generate_kwargs={"do_sample": False})
        seconds = time.perf_counter() - started
        answer = output[0]["generated_text"].strip()
        verdict = ""
        if item["answer"] is not None:
            hit = answer.lower().strip(".") == item["answer"]
            correct += hit
            verdict = f"  (expected {item['answer']}: {'right' if hit else 'WRONG'})"
        print(f"{Path(item['image']).name}: {item['question']} -> {answer}{verdict}  [{seconds:.2f} s]")
    if not args.image:
        print(f"{correct}/{len(questions)} bundled questions answered correctly")


def run_eval(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_vqa
    from .processor import LeoMiniProcessor
    from .training.data import EasyVQADataset
    from .training.mosaic import EasyVQAMosaicDataset

    model = LeoMiniForConditionalGeneration.from_pretrained(args.model)
    processor = LeoMiniProcessor.from_pretrained(args.model)
    if args.dataset == "easy-vqa":
        dataset, limit = EasyVQADataset(args.split), args.limit
    else:  # mosaic-2x2 / mosaic-3x3: a seeded set of `limit` (default 400) mosaic questions
        grid = int(args.dataset[-1])
        dataset, limit = EasyVQAMosaicDataset(args.split, grid, size=args.limit or 400, seed=args.seed), None
    result = evaluate_vqa(model, processor, dataset, limit=limit, batch_size=args.batch_size, seed=args.seed,
                          swap_images=args.swap_images)
    print(json.dumps(result, indent=2))
    print(f"\n| question type | accuracy | questions |\n|---|---|---|")
    for kind, accuracy in result["per_type"].items():
        print(f"| {kind} | {accuracy:.3f} | {result['count_per_type'][kind]} |")
    print(f"| all | {result['accuracy']:.3f} | {result['count']} |")


def run_random_demo(args: argparse.Namespace) -> None:
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
    """Write a complete checkpoint folder (atomically: never a half-written or overwritten folder)."""
    from .conversion.build import build_random_checkpoint
    from .conversion.hub import write_folder_atomically
    from .conversion.pretrained_parts import build_from_pretrained_parts
    from .conversion.smol import build_leo_mini_smol

    overrides = parse_overrides(args.set)
    if args.llm or args.vision_expert:
        if not (args.llm and args.vision_expert):
            raise SystemExit("leo-mini build: --llm needs at least one --vision-expert, and the other way round")
        if args.image_size:
            overrides["image_size"] = args.image_size
        write = lambda folder: build_from_pretrained_parts(args.llm, args.vision_expert, folder, **overrides)  # noqa: E731
    elif args.preset == "leo-mini-smol":
        write = lambda folder: build_leo_mini_smol(folder, **overrides)  # noqa: E731
    elif args.random_init:
        write = lambda folder: build_random_checkpoint(args.preset, folder, seed=args.seed, **overrides)  # noqa: E731
    else:
        raise SystemExit("leo-mini build: give --llm and --vision-expert, --preset leo-mini-smol, "
                         "or --preset tiny --random-init")
    started = time.perf_counter()
    write_folder_atomically(args.out, write)
    print(f"wrote {args.out} ({time.perf_counter() - started:.1f} s)")


def run_convert(args: argparse.Namespace) -> None:
    from .conversion.gguf_llm import convert_gguf_llm
    from .conversion.hub import write_folder_atomically
    from .conversion.llava import convert_llava
    from .conversion.mobilenet_v2 import convert_mobilenet_v2

    if args.source == "llava":
        overrides = parse_overrides(args.set)
        write = lambda folder: convert_llava(args.src, folder, token_reduction=args.token_reduction, **overrides)  # noqa: E731
    elif args.source == "gguf":
        write = lambda folder: convert_gguf_llm(args.src, folder)  # noqa: E731
    else:
        write = lambda folder: convert_mobilenet_v2(args.src, folder)  # noqa: E731
    write_folder_atomically(args.out, write)
    print(f"wrote {args.out}")


def run_export(args: argparse.Namespace) -> None:
    from .conversion.export import export_checkpoint

    started = time.perf_counter()
    export_checkpoint(args.model, args.out, max_shard_size=args.max_shard_size, dtype=args.dtype,
                      repo_id=args.repo_id, license_name=args.license, base_models=args.base_model)
    print(f"exported and verified {args.out} ({time.perf_counter() - started:.1f} s)")


def run_push(args: argparse.Namespace) -> None:
    from .conversion.push import PushError, push_folder

    try:
        url = push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision)
    except (PushError, ValueError) as error:
        raise SystemExit(f"leo-mini push: {error}")
    print(f"pushed {args.folder} to {url}")


def run_train(args: argparse.Namespace, extra: list[str]) -> None:
    """`leo-mini train`: Trainer with every TrainingArguments flag (parsed by HfArgumentParser)."""
    from transformers import HfArgumentParser, TrainingArguments

    from .processor import LeoMiniProcessor
    from .training.collator import LeoMiniDataCollator
    from .training.data import EasyVQADataset, LlavaConversationDataset
    from .training.stages import apply_training_stage, format_parameter_table
    from .training.trainer import LeoMiniTrainer, TrainScriptArguments

    parser = HfArgumentParser((TrainScriptArguments, TrainingArguments))
    script, training = parser.parse_args_into_dataclasses(extra)
    training.remove_unused_columns = False  # the collator needs the raw samples
    model = LeoMiniForConditionalGeneration.from_pretrained(script.model)
    processor = LeoMiniProcessor.from_pretrained(script.model)
    if script.data == "easy-vqa":
        dataset = EasyVQADataset(split=script.split, limit=script.limit)
    else:
        dataset = LlavaConversationDataset(script.data, script.image_root, skip_bad_records=script.skip_bad_records)
        if dataset.skipped:
            print(f"skipped {len(dataset.skipped)} bad record(s); first: {dataset.skipped[0]}")
        if script.limit:
            dataset.samples = dataset.samples[: script.limit]
    print(f"stage '{script.stage}':\n" + format_parameter_table(apply_training_stage(model, script.stage)))
    feature_cache = None
    if script.feature_cache_dir:
        from .training.feature_cache import VisionFeatureCache

        feature_cache = VisionFeatureCache(script.feature_cache_dir)
        feature_cache.attach(model)
    trainer = LeoMiniTrainer(model=model, args=training, train_dataset=dataset,
                             data_collator=LeoMiniDataCollator(processor, script.max_length), processing_class=processor)
    trainer.train(resume_from_checkpoint=training.resume_from_checkpoint)
    if feature_cache is not None:
        feature_cache.detach(model)
        print(f"feature cache {script.feature_cache_dir}: {feature_cache.stats()}")
    trainer.save_model()
    if trainer.is_world_process_zero():
        from .conversion.hub import add_remote_code

        add_remote_code(training.output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="leo-mini", description="LEO-MINI multimodal LLM tools")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run LEO-MINI end to end on its embedded default")
    demo.add_argument("--preset", default="leo-mini-smol", help="leo-mini-smol (trained) or tiny (random)")
    demo.add_argument("--model", help="use this checkpoint folder instead of building the demo one")
    demo.add_argument("--image", help="your own image file")
    demo.add_argument("--question", help="your question about --image")
    demo.add_argument("--max-new-tokens", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(handler=run_demo)

    evaluate = commands.add_parser("eval", help="exact-match accuracy per question type (JSON + table)")
    evaluate.add_argument("--model", required=True)
    evaluate.add_argument("--dataset", default="easy-vqa", choices=["easy-vqa", "mosaic-2x2", "mosaic-3x3"])
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--limit", type=int, help="seeded sample of N questions (mosaics: N questions, default 400)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--swap-images", action="store_true",
                          help="control: show each question another sample's image (what the question alone gives)")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.set_defaults(handler=run_eval)

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
    except (FileExistsError, FileNotFoundError, ValueError) as error:
        print(f"leo-mini {args.command}: {error}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
