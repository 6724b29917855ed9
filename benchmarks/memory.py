"""Weight bytes, peak memory and decode speed: LEO-MINI beside LLaVA with the same LLM and vision tower (#43).

Table 1, weight bytes and peak RSS, per model shape and load:
- shapes: SmolLM2-135M + ViT-S/16 (224 px) and Llama-3.2-1B + CLIP-L/336, random weights saved once as float32
  safetensors (benchmarks/.work/memory), both for LEO-MINI (the SmolLM2 shape with LEO-MINI-Smol's sizes: CoTR 16,
  MMoE rank 4, router width 16; the 1B shape with the defaults: CoTR 64, rank 16, router width 128; 3 experts on
  down_proj), twice: `leo-mini` with today's default routers (reading A_g x, one shared context projection) and
  `leo-mini-per-layer-router` with the routers of checkpoints saved before them (LEO-MINI-Smol's demo weights: each
  router projects the hidden state and the context itself); and transformers' LlavaForConditionalGeneration;
- loads: float32, bfloat16, torchao int8 weight-only and bitsandbytes nf4 (both on a bfloat16 load), each with
  `from_pretrained` in a fresh process that then generates 8 tokens for one image and 64 text tokens; peak RSS is
  that process's (imports included: `baseline` is the RSS after the imports, before loading);
- the Llama-3-8B shape (`leo-mini-llama3-8b` preset beside LLaVA with Llama-3-8B + CLIP-L/336) is counted on the meta
  device: float32/bfloat16 exactly; int8/nf4 from the bytes per element each parameter had at the 1B shape under the
  same backend (same parameter names; a name the 1B model lacks counts at bfloat16).

Table 2, decode tokens/s (SmolLM2 shape: float32 at batch 1 and 8, bfloat16 at batch 1; `decode-1b`: the 1B shape,
float32, batch 1): greedy `generate` of 1 and of 17 new tokens, the difference over 16 tokens; the models alternate within
each round, and the ratio is taken per round.

    python benchmarks/memory.py                 # both tables → benchmarks/results/memory/
    python benchmarks/memory.py --part decode   # one table only (memory | decode)
    python benchmarks/memory.py --part decode-1b --rounds 4   # decode at the 1B shape (float32, batch 1)
"""

import argparse
import gc
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from transformers import LlavaConfig, LlavaForConditionalGeneration
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from common import ROOT, peak_rss_mb, write_results
from efficiency import CLIP_L_336, IMAGE_TOKEN_ID, LLAMA3_8B, LLAMA_1B, SMALL_LLM, SMALL_VIT, TEXT_TOKENS
from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration, preset_config
from leo_mini_hf.presets import SMOL_OPTIONS
from quantization import quantization_config, stored_bytes

WORK = ROOT / "benchmarks" / ".work" / "memory"
THREADS = 2
NEW_TOKENS = 8
# shape → (LLM config, vision tower config, image size, image token id)
SHAPES = {"smol": (SMALL_LLM, SMALL_VIT, 224, IMAGE_TOKEN_ID), "1b": (LLAMA_1B, CLIP_L_336, 336, 128002)}
ARCHS = ["leo-mini", "leo-mini-per-layer-router", "llava"]
LEO_ARCHS = ARCHS[:2]
# the router layout of checkpoints saved before `mmoe_router_token_input` / `mmoe_router_context` (the demo weights')
PER_LAYER_ROUTER = {"mmoe_router_token_input": "hidden_state", "mmoe_router_context": "per_layer"}
SMOL_SIZES = {name: value for name, value in SMOL_OPTIONS.items() if name not in PER_LAYER_ROUTER}
LOADS = ["float32", "bfloat16", "torchao-int8", "bitsandbytes-nf4"]
BACKEND = {"torchao-int8": "torchao-int8-weight-only", "bitsandbytes-nf4": "bitsandbytes-nf4"}
ADAPTER = re.compile(r"\.(general_lora_[AB]|experts_lora_[AB]|router\.)|mmoe_router_context\.")


def build(shape: str, arch: str, device: str = "cpu"):
    """A random-weight model of `shape` ("smol", "1b" or "8b"); (model, visual tokens per image)."""
    torch.manual_seed(0)
    if shape == "8b":
        llm, vision, image_size, token = LLAMA3_8B, CLIP_L_336, 336, 128002
    else:
        llm, vision, image_size, token = SHAPES[shape]
    with torch.device(device):
        if arch in LEO_ARCHS:
            router = PER_LAYER_ROUTER if arch == "leo-mini-per-layer-router" else {}
            if shape == "8b":
                config = preset_config("leo-mini-llama3-8b", **router)
            else:
                expert = {"config": vision, "image_size": image_size, "feature_layer": -2, "num_prefix_tokens": 1,
                          "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
                options = SMOL_SIZES if shape == "smol" else {}  # LEO-MINI-Smol's sizes; the 1B shape: the defaults
                config = LeoMiniConfig(text_config=llm, vision_experts=[expert], image_size=image_size,
                                       image_mean=CLIP_MEAN, image_std=CLIP_STD, image_token_id=token, **options,
                                       **router)
            return LeoMiniForConditionalGeneration(config).eval(), config.num_image_tokens
        grid = vision["image_size"] // vision["patch_size"]
        config = LlavaConfig(vision_config=vision, text_config=llm, image_token_id=token, image_seq_length=grid * grid)
        return LlavaForConditionalGeneration(config).eval(), grid * grid


def checkpoint(shape: str, arch: str) -> Path:
    """The saved random-weight float32 checkpoint (made once; `.complete` marks a finished save)."""
    folder = WORK / f"{shape}-{arch}"
    if not (folder / ".complete").exists():
        model, _ = build(shape, arch)
        model.save_pretrained(folder)
        (folder / ".complete").write_text("")
        del model
        gc.collect()
    return folder


def prompt_inputs(shape: str, tokens_per_image: int, batch: int = 1) -> dict:
    """`batch` prompts of one image block + TEXT_TOKENS random text tokens, and their images."""
    _, _, image_size, token = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 1000, (batch, TEXT_TOKENS), generator=generator)
    input_ids = torch.cat([torch.full((batch, tokens_per_image), token), text], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator)}


def part_of(name: str) -> str:
    """Which part of either model a parameter or buffer belongs to: llm, adapters (MMoE), connector or vision."""
    if ADAPTER.search(name):
        return "adapters"
    if "language_model" in name or name.startswith("lm_head"):
        return "llm"
    if "token_reducer" in name or "multi_modal_projector" in name:
        return "connector"
    return "vision"


def held_bytes(tensor: torch.Tensor) -> int:
    """`stored_bytes`, plus what bitsandbytes keeps beside its packed weights (4-bit: absmax and code in
    `quant_state`, nested under double quantization; 8-bit: the row scales `SCB`). quantization.py's memory column
    leaves these out (nf4 LEO-MINI-Smol: about 6.6 MB of absmax)."""
    total = stored_bytes(tensor)
    state = getattr(tensor, "quant_state", None)
    while state is not None:
        total += sum(stored_bytes(t) for t in (state.absmax, state.code) if isinstance(t, torch.Tensor))
        state = getattr(state, "state2", None)
    scales = getattr(tensor, "SCB", None)
    return total + (stored_bytes(scales) if isinstance(scales, torch.Tensor) else 0)


def bytes_by_name(model) -> dict[str, tuple[int, int]]:
    """name → (elements, bytes held) for every parameter and buffer (tied tensors once)."""
    seen, counts = set(), {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        elements = tensor.numel() * (2 if type(tensor).__name__ == "Params4bit" else 1)  # two 4-bit values a byte
        counts[name] = (elements, held_bytes(tensor))
    return counts


def by_part(counts: dict[str, tuple[int, int]]) -> dict[str, int]:
    parts = {"llm": 0, "adapters": 0, "connector": 0, "vision": 0}
    for name, (_, size) in counts.items():
        parts[part_of(name)] += size
    return parts


def memory_worker(shape: str, arch: str, load: str) -> dict:
    """In a fresh process: load the checkpoint as `load`, count its bytes, generate, report the peak RSS."""
    torch.set_num_threads(THREADS)
    baseline = peak_rss_mb()
    kwargs = {"dtype": torch.float32 if load == "float32" else torch.bfloat16}
    if load in BACKEND:
        kwargs.update(quantization_config=quantization_config(BACKEND[load]), device_map="cpu")
    model_class = LeoMiniForConditionalGeneration if arch in LEO_ARCHS else LlavaForConditionalGeneration
    started = time.perf_counter()
    model = model_class.from_pretrained(checkpoint(shape, arch), **kwargs).eval()
    load_seconds = time.perf_counter() - started
    after_load = peak_rss_mb()
    counts = bytes_by_name(model)
    tokens = model.config.num_image_tokens if arch in LEO_ARCHS else model.config.image_seq_length
    with torch.no_grad():
        started = time.perf_counter()
        model.generate(**prompt_inputs(shape, tokens), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                       do_sample=False, pad_token_id=0)
    return {"shape": shape, "arch": arch, "load": load, "weight_bytes": sum(b for _, b in counts.values()),
            "bytes_by_part": by_part(counts), "baseline_rss_mb": baseline, "rss_after_load_mb": after_load,
            "peak_rss_mb": peak_rss_mb(), "load_seconds": load_seconds, "generate_seconds": time.perf_counter() - started,
            "bytes_per_element": {name: size / elements for name, (elements, size) in counts.items() if elements}}


def pattern(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


def meta_row(arch: str, load: str, measured_1b: dict | None) -> dict:
    """The Llama-3-8B shape on the meta device: bytes from element counts (see the module docstring)."""
    model, _ = build("8b", arch, device="meta")
    per_element = {}
    if measured_1b is not None:
        for name, value in measured_1b["bytes_per_element"].items():
            per_element.setdefault(pattern(name), value)
    fallback = 4 if load == "float32" else 2
    exact = load in ("float32", "bfloat16")
    counts = {}
    for name, (elements, _) in bytes_by_name(model).items():
        if exact:  # a bfloat16 load casts LEO-MINI's own modules too (only float16 keeps them in float32)
            counts[name] = (elements, elements * (4 if load == "float32" else 2))
        else:
            counts[name] = (elements, round(elements * per_element.get(pattern(name), fallback)))
    unmatched = sum(e for n, (e, _) in counts.items() if not exact and pattern(n) not in per_element)
    return {"shape": "8b", "arch": arch, "load": load, "weight_bytes": sum(b for _, b in counts.values()),
            "bytes_by_part": by_part(counts), "estimated": not exact, "elements_at_bfloat16_estimate": unmatched}


def run_memory(out: Path) -> list[dict]:
    rows_dir = WORK / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in SHAPES:
        for arch in ARCHS:
            checkpoint(shape, arch)
            for load in LOADS:
                path = rows_dir / f"{shape}-{arch}-{load}.json"
                if not path.exists():  # resumable: a finished row is kept
                    command = [sys.executable, __file__, "--memory-worker", shape, arch, load]
                    done = subprocess.run(command, capture_output=True, text=True)
                    if done.returncode:
                        raise RuntimeError(f"{shape} {arch} {load} failed:\n{done.stderr[-3000:]}")
                    path.write_text(done.stdout.strip().splitlines()[-1])
                rows.append(json.loads(path.read_text()))
                print(f"  {shape} {arch} {load}: {rows[-1]['weight_bytes'] / 2**20:.1f} MiB, "
                      f"peak {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
    for arch in ARCHS:
        for load in LOADS:
            measured = next(r for r in rows if (r["shape"], r["arch"], r["load"]) == ("1b", arch, load))
            rows.append(meta_row(arch, load, measured))
    return rows


def memory_lines(rows: list[dict]) -> list[str]:
    lines = ["## Weight bytes and peak RSS\n",
             "Weight bytes: what parameters and buffers hold (quantized: packed data, scales, bitsandbytes' absmax). "
             f"Peak RSS: the process that loads the checkpoint and generates {NEW_TOKENS} tokens (1 image, "
             f"{TEXT_TOKENS} text tokens); `baseline` is its RSS after the imports. 8B: meta device, "
             "int8/nf4 estimated from the 1B shape's bytes per element.\n",
             "| shape | load | model | weights MiB | LLM | MMoE adapters | reducer + projector | vision | "
             "weights vs LLaVA | peak RSS MB (baseline) | peak vs LLaVA |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    mib = lambda x: f"{x / 2**20:,.1f}"  # noqa: E731
    for r in rows:
        llava = next(x for x in rows if (x["shape"], x["load"], x["arch"]) == (r["shape"], r["load"], "llava"))
        parts = r["bytes_by_part"]
        peak = f"{r['peak_rss_mb']:,.0f} ({r['baseline_rss_mb']:.0f})" if "peak_rss_mb" in r else "-"
        peak_ratio = f"{r['peak_rss_mb'] / llava['peak_rss_mb']:.3f}" if "peak_rss_mb" in r else "-"
        estimate = " (estimate)" if r.get("estimated") else ""
        lines.append(f"| {r['shape']} | {r['load']}{estimate} | {r['arch']} | {mib(r['weight_bytes'])} | "
                     f"{mib(parts['llm'])} | {mib(parts['adapters'])} | {mib(parts['connector'])} | "
                     f"{mib(parts['vision'])} | {r['weight_bytes'] / llava['weight_bytes']:.3f} | {peak} | "
                     f"{peak_ratio} |")
    return lines


# ---------------------------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------------------------

def generate_seconds(model, inputs, new_tokens: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=0)
    return time.perf_counter() - started


def decode_tokens_per_second(model, inputs, new_tokens: int = 16) -> float:
    """Decoding alone: generate(new_tokens + 1) − generate(1) seconds, over batch × new_tokens tokens."""
    decode = generate_seconds(model, inputs, new_tokens + 1) - generate_seconds(model, inputs, 1)
    return inputs["input_ids"].shape[0] * new_tokens / decode


def ratio_mean_and_error(values: list[float], reference: list[float]) -> tuple[float, float]:
    """Mean and standard error of the per-round ratios values[i] / reference[i]."""
    ratios = [a / b for a, b in zip(values, reference)]
    return statistics.mean(ratios), statistics.stdev(ratios) / math.sqrt(len(ratios))


# shape → {load: batches}. bfloat16 at batch 8 is left out: on this CPU a bfloat16 prefill of 8 prompts takes minutes.
DECODE_ROWS = {"smol": {"float32": (1, 8), "bfloat16": (1,)}, "1b": {"float32": (1,)}}


def run_decode(rounds: int, shape: str, new_tokens: int = 16) -> list[dict]:
    """Decode rows for `shape` (DECODE_ROWS), each saved once finished."""
    torch.set_num_threads(THREADS)
    rows = []
    rows_dir = WORK / "decode-rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    for load, batches in DECODE_ROWS[shape].items():
        models = {}
        for arch in ARCHS:
            model, tokens = build(shape, arch)
            models[arch] = (model.to(getattr(torch, load)), tokens)
        for batch in batches:
            path = rows_dir / f"{shape}-{load}-{batch}-{rounds}.json"
            if path.exists():  # resumable: a finished row is kept
                rows.append(json.loads(path.read_text()))
                continue
            inputs = {arch: prompt_inputs(shape, tokens, batch) for arch, (_, tokens) in models.items()}
            for arch, (model, _) in models.items():
                generate_seconds(model, inputs[arch], 2)  # warm-up
            speeds = {arch: [] for arch in ARCHS}
            for _ in range(rounds):
                for arch, (model, _) in models.items():
                    speeds[arch].append(decode_tokens_per_second(model, inputs[arch], new_tokens))
            ratios = {arch: ratio_mean_and_error(speeds[arch], speeds["llava"]) for arch in LEO_ARCHS}
            row = {"shape": shape, "load": load, "batch": batch, "rounds": rounds, "tokens_per_second": speeds,
                   "median": {arch: statistics.median(v) for arch, v in speeds.items()},
                   "ratio_to_llava": {arch: {"mean": mean, "standard_error": error}
                                      for arch, (mean, error) in ratios.items()}}
            rows.append(row)
            path.write_text(json.dumps(row))
            print(f"  decode {load} batch {batch}: {row['median']}, ratios {ratios}", flush=True)
        del models
        gc.collect()
    return rows


def decode_lines(rows: list[dict], shape: str, new_tokens: int = 16) -> list[str]:
    title = {"smol": "SmolLM2-135M + ViT-S/16", "1b": "Llama-3.2-1B + CLIP-L/336"}[shape]
    lines = [f"## Decode tokens/s ({title} shape, random weights)\n",
             f"Greedy; decode = generate({new_tokens + 1} new tokens) − generate(1 new token); median over rounds in "
             "which the models alternate; ratio = LEO-MINI / LLaVA per round, mean ± standard error. *per-layer "
             "router*: LEO-MINI with the routers of checkpoints saved before today's default.\n",
             "| load | batch | LEO-MINI tok/s | per-layer router tok/s | LLaVA tok/s | LEO-MINI / LLaVA | "
             "per-layer router / LLaVA | rounds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        median, ratio = r["median"], r["ratio_to_llava"]
        lines.append(f"| {r['load']} | {r['batch']} | " + " | ".join(f"{median[arch]:.1f}" for arch in ARCHS) + " | "
                     + " | ".join(f"{ratio[arch]['mean']:.3f} ± {ratio[arch]['standard_error']:.3f}"
                                  for arch in LEO_ARCHS) + f" | {r['rounds']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["memory", "decode", "decode-1b"],
                        help="one table only (decode-1b: the 1B shape at float32, batch 1; not in the default run)")
    parser.add_argument("--rounds", type=int, default=10, help="decode rounds per (load, batch)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory")
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return
    command = shlex.join(["python", "benchmarks/memory.py", *sys.argv[1:]])
    for part in [args.part] if args.part else ["memory", "decode"]:
        started = time.perf_counter()
        if part == "memory":
            rows = run_memory(args.out)
            lines = memory_lines(rows)
        else:
            shape = "1b" if part == "decode-1b" else "smol"
            rows = run_decode(args.rounds, shape)
            lines = decode_lines(rows, shape)
        minutes = (time.perf_counter() - started) / 60
        header = [f"# {'Memory' if part == 'memory' else 'Decode'}: LEO-MINI beside LLaVA, same LLM and tower\n",
                  f"Command: `{command}` ({minutes:.1f} min; torch {torch.__version__}, {THREADS} threads)\n"]
        for row in rows:
            row.pop("bytes_per_element", None)
        write_results(args.out / part.replace("-", "_"), {"command": command, "minutes": minutes, "rows": rows}, header + lines)


if __name__ == "__main__":
    main()
