"""Efficiency: LEO-MINI against what users would pick instead, as ratios.

Part 1, the paper's scale without weights: prefill FLOPs on the meta device (FlopCounterMode, eager attention) for
LEO-Mini-Llama3-8B and its peers at their real sizes, split into vision / reducer / projector / LLM, checked against
the closed form, plus KV-cache bytes per image.

Part 2, measured here: the same ~135M LLM and the same vision tower in LEO-MINI (N_V = 64, 16), LEO-MINI with
`token_reduction="none"`, transformers' LlavaForConditionalGeneration and InstructBlipForConditionalGeneration
(num_query_tokens matched): prefill latency, decode tokens/s, peak memory (one process per model), CoTR + router
overhead, and scaling curves. Random weights: time does not depend on their values.

    python benchmarks/efficiency.py              # writes benchmarks/results/efficiency/efficiency.{json,md} and plots
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from transformers import (
    AutoConfig,
    AutoModel,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from common import ROOT, peak_rss_mb
from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration, preset_config
from leo_mini_hf.modeling.mmoe import MMoERouter, MMoERouterContext
from leo_mini_hf.presets import leo_mini_llama3_8b

TEXT_TOKENS = 64  # prompt text tokens per sample in every FLOP count and measurement
THREADS = 2

# ---------------------------------------------------------------------------------------------------------------
# Part 1: the paper's scale, counted on the meta device
# ---------------------------------------------------------------------------------------------------------------

LLAMA3_8B = leo_mini_llama3_8b()["text_config"]
VICUNA_7B = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14}


def flops_of(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def closed_form_llm_flops(text_config, n: int, n_lm: int = 1) -> int:
    """L·(2n(2d² + 2d·d_kv) + 4n²d + 6ndm) + 2·n_lm·d·V (matmul FLOPs of a prefill of n tokens)."""
    d, m, layers = text_config["hidden_size"], text_config["intermediate_size"], text_config["num_hidden_layers"]
    d_kv = d * text_config["num_key_value_heads"] // text_config["num_attention_heads"]
    return layers * (2 * n * (2 * d * d + 2 * d * d_kv) + 4 * n * n * d + 6 * n * d * m) + 2 * n_lm * d * text_config["vocab_size"]


def llm_flops(text_config: dict, visual_tokens: int) -> int:
    """Counted prefill FLOPs of the decoder on visual + text tokens, and the LM head on the last position."""
    config = AutoConfig.for_model(**text_config)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        decoder = AutoModel.from_config(config, attn_implementation="eager")
        head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        embeds = torch.empty(1, visual_tokens + TEXT_TOKENS, config.hidden_size)
    return flops_of(lambda: head(decoder(inputs_embeds=embeds).last_hidden_state[:, -1:]))


def kv_cache_bytes(text_config: dict, tokens: int, bytes_per_value: int = 2) -> int:
    head_dim = text_config["hidden_size"] // text_config["num_attention_heads"]
    return 2 * text_config["num_hidden_layers"] * text_config["num_key_value_heads"] * head_dim * bytes_per_value * tokens


def leo_mini_paper_counts(token_reduction: str = "cotr", full_token_grid: int | None = None) -> dict:
    overrides = {"token_reduction": token_reduction}
    if full_token_grid:
        overrides["full_token_grid"] = full_token_grid
    config = preset_config("leo-mini-llama3-8b", **overrides)
    with torch.device("meta"):
        model = LeoMiniForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    pixels = torch.empty(1, 3, config.image_size, config.image_size, device="meta")
    with torch.device("meta"):
        features = [expert(pixels) for expert in model.vision_experts]
    vision = flops_of(lambda: [expert(pixels) for expert in model.vision_experts])
    text_sum = torch.empty(1, config.text_config.hidden_size, device="meta")
    reducer = flops_of(lambda: model.token_reducer(features, text_sum)) if token_reduction == "cotr" else 0
    reduced = model.token_reducer(features, text_sum)  # without reduction: the grids resampled
    projector = flops_of(lambda: model.multi_modal_projector(reduced))
    tokens = config.num_image_tokens
    return {"visual_tokens": tokens, "vision": vision, "reducer": reducer, "projector": projector,
            "llm": llm_flops(LLAMA3_8B, tokens), "mmoe": mmoe_flops(config, tokens + TEXT_TOKENS)
            if token_reduction == "cotr" else 0, "text_config": LLAMA3_8B}


def mmoe_flops(config, n: int) -> int:
    """MMoE on down_proj of every layer, computed densely: general + routed LoRA (rank r each) + router."""
    d, m = config.text_config.hidden_size, config.text_config.intermediate_size
    r, experts, hidden = config.mmoe_rank, config.mmoe_num_experts, config.mmoe_router_hidden_size
    per_token = 2 * r * (m + d) * (1 + experts) + 2 * m * hidden + 2 * hidden * experts
    per_sample = 2 * (2 * d) * hidden
    return config.text_config.num_hidden_layers * (n * per_token + per_sample)


def llava_paper_counts(text_config: dict, crops: int) -> dict:
    """LLaVA-1.5 (1 crop, 576 tokens) or LLaVA-NeXT-style anyres (5 crops of 336 px, 2880 tokens)."""
    config = LlavaConfig(vision_config=CLIP_L_336, text_config=text_config, image_token_id=0)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    pixels = torch.empty(crops, 3, 336, 336, device="meta")
    vision = flops_of(lambda: model.model.vision_tower(pixels, output_hidden_states=True))
    tokens = crops * 576
    features = torch.empty(1, tokens, 1024, device="meta")
    projector = flops_of(lambda: model.model.multi_modal_projector(features))  # LLaVA's inner model
    return {"visual_tokens": tokens, "vision": vision, "reducer": 0, "projector": projector,
            "llm": llm_flops(text_config, tokens), "mmoe": 0, "text_config": text_config}


def instructblip_paper_counts() -> dict:
    """InstructBLIP-Vicuna-7B: EVA-CLIP-g (224 px) → Q-Former, 32 query tokens → Vicuna-7B."""
    config = InstructBlipConfig(text_config=VICUNA_7B)
    with torch.device("meta"):
        model = InstructBlipForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    image = config.vision_config.image_size
    pixels = torch.empty(1, 3, image, image, device="meta")
    vision = flops_of(lambda: model.vision_model(pixels))
    with torch.device("meta"):
        image_embeds = model.vision_model(pixels).last_hidden_state
        queries = model.query_tokens.expand(1, -1, -1)
        instruction = torch.zeros(1, TEXT_TOKENS, dtype=torch.long)
    qformer = flops_of(lambda: model.qformer(input_ids=instruction, query_embeds=queries, encoder_hidden_states=image_embeds))
    tokens = config.num_query_tokens
    projector = flops_of(lambda: model.language_projection(torch.empty(1, tokens, config.qformer_config.hidden_size,
                                                                       device="meta")))
    return {"visual_tokens": tokens, "vision": vision, "reducer": qformer, "projector": projector,
            "llm": llm_flops(VICUNA_7B, tokens), "mmoe": 0, "text_config": VICUNA_7B}


def paper_scale() -> dict:
    models = {
        "LEO-Mini-Llama3-8B (CoTR, 64)": leo_mini_paper_counts(),
        "EAGLE-X4-8B-style (4 experts, 1024)": leo_mini_paper_counts("none", full_token_grid=32),
        "LLaVA-NeXT-8B-style (anyres, 2880)": llava_paper_counts(LLAMA3_8B, crops=5),
        "LLaVA-1.5-7B (576)": llava_paper_counts(VICUNA_7B, crops=1),
        "InstructBLIP-Vicuna-7B (Q-Former, 32)": instructblip_paper_counts(),
    }
    report = {}
    for name, counts in models.items():
        text_config = counts.pop("text_config")
        n = counts["visual_tokens"] + TEXT_TOKENS
        closed = closed_form_llm_flops(text_config, n)
        counts["llm_closed_form"] = closed
        counts["llm_closed_form_ratio"] = counts["llm"] / closed
        counts["total"] = counts["vision"] + counts["reducer"] + counts["projector"] + counts["llm"] + counts["mmoe"]
        counts["without_vision"] = counts["total"] - counts["vision"]
        counts["kv_cache_bytes_per_image"] = kv_cache_bytes(text_config, counts["visual_tokens"])
        report[name] = counts
    next_name = "LLaVA-NeXT-8B-style (anyres, 2880)"
    leo = report["LEO-Mini-Llama3-8B (CoTR, 64)"]
    for key in ("total", "without_vision"):
        leo[f"reduction_vs_llava_next_{key}"] = 1 - leo[key] / report[next_name][key]
    return report


# ---------------------------------------------------------------------------------------------------------------
# Part 2: measured on this machine
# ---------------------------------------------------------------------------------------------------------------

SMALL_LLM = {"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
             "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True,
             "max_position_embeddings": 16384}  # SmolLM2-135M's shape
SMALL_VIT = {"model_type": "clip_vision_model", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
             "num_attention_heads": 6, "image_size": 224, "patch_size": 16}  # ViT-S/16: 196 tokens, 21M parameters
IMAGE_TOKEN_ID = 49151
SMALL_MODELS = ["leo-mini-cotr-64", "leo-mini-cotr-16", "leo-mini-full", "llava", "instructblip-64", "instructblip-16"]


def small_model(name: str, image_size: int = 224):
    """(model, tokens per image) for one of SMALL_MODELS, random weights, eval mode."""
    torch.manual_seed(0)
    vit = dict(SMALL_VIT, image_size=image_size)
    grid = image_size // vit["patch_size"]
    if name.startswith("leo-mini"):
        reduction = "none" if name.endswith("full") else "cotr"
        num_visual = int(name.split("-")[-1]) if reduction == "cotr" else 64
        expert = {"config": vit, "image_size": image_size, "feature_layer": -2, "num_prefix_tokens": 1,
                  "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        config = LeoMiniConfig(text_config=SMALL_LLM, vision_experts=[expert], image_size=image_size,
                               image_mean=CLIP_MEAN, image_std=CLIP_STD, image_token_id=IMAGE_TOKEN_ID,
                               token_reduction=reduction, num_visual_tokens=num_visual, full_token_grid=grid,
                               cotr_projection_dim=128, mmoe_rank=4, mmoe_alpha=8, mmoe_router_hidden_size=16)
        model = LeoMiniForConditionalGeneration(config)
        tokens = config.num_image_tokens
    elif name == "llava":
        config = LlavaConfig(vision_config=vit, text_config=SMALL_LLM, image_token_id=IMAGE_TOKEN_ID,
                             image_seq_length=grid * grid)
        model = LlavaForConditionalGeneration(config)
        tokens = grid * grid
    else:
        queries = int(name.split("-")[-1])
        vision = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12, "num_attention_heads": 6,
                  "image_size": image_size, "patch_size": 16}
        qformer = {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 6,
                   "encoder_hidden_size": 384, "vocab_size": 30522}
        config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=SMALL_LLM,
                                    num_query_tokens=queries, image_token_index=IMAGE_TOKEN_ID)
        model = InstructBlipForConditionalGeneration(config)
        tokens = queries
    return model.eval(), tokens


def model_inputs(name: str, model, tokens_per_image: int, batch: int, images: int, image_size: int = 224) -> dict:
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 1000, (batch, TEXT_TOKENS), generator=generator)
    image_block = torch.full((batch, tokens_per_image * images), IMAGE_TOKEN_ID)
    if name.startswith("instructblip"):  # InstructBLIP takes one image per sample
        image_block = image_block[:, :tokens_per_image]
        images = 1
    input_ids = torch.cat([image_block, text], dim=1)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "pixel_values": torch.randn(batch * images, 3, image_size, image_size, generator=generator)}
    if name.startswith("instructblip"):
        inputs["qformer_input_ids"] = text[:, :32]
        inputs["qformer_attention_mask"] = torch.ones_like(inputs["qformer_input_ids"])
    return inputs


@torch.no_grad()
def time_prefill(model, inputs, repeats: int) -> float:
    model(**inputs, logits_to_keep=1)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(**inputs, logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.no_grad()
def decode_tokens_per_second(model, inputs, prefill: float, new_tokens: int = 16) -> float:
    started = time.perf_counter()
    model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    decode = time.perf_counter() - started - prefill
    return inputs["input_ids"].shape[0] * (new_tokens - 1) / max(decode, 1e-9)


@torch.no_grad()
def cotr_router_share(model, inputs, repeats: int = 10) -> dict:
    """Seconds inside CoTR and the MMoE routers, as a share of the prefill (forward hooks, batch as given)."""
    spent = {"cotr": 0.0, "routers": 0.0}
    starts = {}

    def before(key):
        return lambda module, args: starts.__setitem__(id(module), time.perf_counter())

    def after(key):
        def hook(module, args, output):
            spent[key] += time.perf_counter() - starts.pop(id(module))
        return hook

    handles = [model.token_reducer.register_forward_pre_hook(before("cotr")),
               model.token_reducer.register_forward_hook(after("cotr"))]
    for module in model.modules():
        if isinstance(module, (MMoERouter, MMoERouterContext)):
            handles += [module.register_forward_pre_hook(before("routers")), module.register_forward_hook(after("routers"))]
    model(**inputs, logits_to_keep=1)
    spent.update(cotr=0.0, routers=0.0)
    started = time.perf_counter()
    for _ in range(repeats):
        model(**inputs, logits_to_keep=1)
    total = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    return {"cotr_share": spent["cotr"] / total, "router_share": spent["routers"] / total,
            "overhead_share": (spent["cotr"] + spent["routers"]) / total}


def worker(name: str, quick: bool) -> dict:
    """Everything measured for one model, in its own process (so its peak memory is its own)."""
    torch.set_num_threads(THREADS)
    model, tokens = small_model(name)
    result = {"model": name, "tokens_per_image": tokens, "parameters": sum(p.numel() for p in model.parameters()),
              "workloads": []}
    for batch in (1, 8):
        for images in (1, 4):
            if name.startswith("instructblip") and images > 1:
                continue  # one image per prompt in InstructBLIP
            inputs = model_inputs(name, model, tokens, batch, images)
            repeats = (20 if batch == 1 else 5) if not quick else 2
            prefill = time_prefill(model, inputs, repeats)
            result["workloads"].append({
                "batch": batch, "images": images, "sequence": inputs["input_ids"].shape[1], "repeats": repeats,
                "prefill_seconds": prefill, "decode_tokens_per_second": decode_tokens_per_second(model, inputs, prefill),
            })
    # peak memory over the workloads every model runs (the curves below build larger models for LEO-MINI only)
    result["peak_rss_workloads_mb"] = peak_rss_mb()
    if name.startswith("leo-mini-cotr"):
        result["overhead"] = cotr_router_share(model, model_inputs(name, model, tokens, 1, 1))
    if name in ("leo-mini-cotr-64", "leo-mini-full"):
        repeats = 5 if not quick else 1
        result["images_curve"] = [
            {"images": images, "prefill_seconds": time_prefill(model, model_inputs(name, model, tokens, 1, images), repeats)}
            for images in (1, 2, 4, 8)
        ]
        result["tokens_curve"] = []
        for image_size in (192, 256, 384, 512, 768, 1024):  # 144 ... 4096 tokens per expert
            sized, sized_tokens = small_model(name, image_size)
            inputs = model_inputs(name, sized, sized_tokens, 1, 1, image_size)
            result["tokens_curve"].append({"expert_tokens": (image_size // 16) ** 2,
                                           "prefill_seconds": time_prefill(sized, inputs, repeats)})
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def measure_all(quick: bool) -> list[dict]:
    results = []
    for name in SMALL_MODELS:
        started = time.perf_counter()
        command = [sys.executable, __file__, "--worker", name] + (["--quick"] if quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  measured {name} in {time.perf_counter() - started:.0f} s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Where the LLM dominates: a 1B-class LLM (Llama-3.2-1B's shape) with a CLIP-L/336-shaped expert, measured
# ---------------------------------------------------------------------------------------------------------------

LLAMA_1B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": True,
            "hidden_act": "silu", "rms_norm_eps": 1e-5}  # Llama-3.2-1B's shape
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14}  # 576 tokens per image
BILLION_IMAGE_TOKEN_ID = 128002
BILLION_MODELS = {"leo-mini-cotr-64": 1, "llava-1.5-576": 1, "llava-next-2880": 5}  # name → images (crops) per prompt


def billion_model(name: str):
    """(model, tokens per image) at the 1B scale, random weights, eval mode."""
    if name.startswith("leo-mini"):
        expert = {"config": CLIP_L_336, "image_size": 336, "feature_layer": -2, "num_prefix_tokens": 1,
                  "image_mean": CLIP_MEAN, "image_std": CLIP_STD}
        config = LeoMiniConfig(text_config=LLAMA_1B, vision_experts=[expert], image_size=336, image_mean=CLIP_MEAN,
                               image_std=CLIP_STD, image_token_id=BILLION_IMAGE_TOKEN_ID, num_visual_tokens=64)
        return LeoMiniForConditionalGeneration(config).eval(), config.num_image_tokens
    config = LlavaConfig(vision_config=CLIP_L_336, text_config=LLAMA_1B, image_token_id=BILLION_IMAGE_TOKEN_ID,
                         image_seq_length=576)
    return LlavaForConditionalGeneration(config).eval(), 576


def billion_inputs(name: str, tokens_per_image: int) -> dict:
    images = BILLION_MODELS[name]
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(10, 1000, (1, TEXT_TOKENS), generator=generator)
    input_ids = torch.cat([torch.full((1, tokens_per_image * images), BILLION_IMAGE_TOKEN_ID), text], dim=1)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(images, 3, 336, 336, generator=generator)}


def billion_worker(name: str, repeats: int) -> dict:
    """Counted FLOPs (one forward with eager attention: FlopCounterMode does not see SDPA on CPU), measured prefill
    time (SDPA) and peak memory, in one process."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model, tokens = billion_model(name)
    inputs = billion_inputs(name, tokens)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        flops = flops_of(lambda: model(**inputs, logits_to_keep=1))
    model.set_attn_implementation("sdpa")
    prefill = time_prefill(model, inputs, repeats)
    return {"model": name, "images": BILLION_MODELS[name], "sequence": inputs["input_ids"].shape[1],
            "parameters": sum(p.numel() for p in model.parameters()), "prefill_flops": flops,
            "prefill_seconds": prefill, "repeats": repeats,
            "peak_rss_mb": peak_rss_mb()}


def measure_billion(out: Path, repeats: int) -> None:
    started = time.perf_counter()
    rows = []
    for name in BILLION_MODELS:
        command = [sys.executable, __file__, "--worker-1b", name, "--repeats", str(repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  measured {name}: {rows[-1]['prefill_seconds']:.1f} s", flush=True)
    command = f"python benchmarks/efficiency.py --billion --repeats {repeats}"
    machine = f"{platform.machine()}, {THREADS} threads, torch {torch.__version__}"
    reference = next(r for r in rows if r["model"] == "llava-next-2880")
    lines = ["# Efficiency where the LLM dominates: Llama-3.2-1B shape + CLIP-L/336 shape, random weights, fp32\n",
             f"Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min)  \nMachine: {machine}; batch 1, "
             f"{TEXT_TOKENS} text tokens; prefill = median of {repeats} after a warm-up; FLOPs counted in one extra "
             "forward with eager attention (FlopCounterMode does not see SDPA on CPU); peak RSS of the measuring "
             "process (weights included).\n",
             "| model | images | sequence | prefill TFLOPs | FLOPs vs LLaVA-NeXT | prefill s | time vs LLaVA-NeXT | "
             "peak RSS |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['images']} | {r['sequence']} | {r['prefill_flops'] / 1e12:.2f} | "
                     f"{r['prefill_flops'] / reference['prefill_flops']:.3f} | {r['prefill_seconds']:.1f} | "
                     f"{r['prefill_seconds'] / reference['prefill_seconds']:.3f} | {r['peak_rss_mb'] / 1024:.1f} GB |")
    (out / "efficiency_1b.md").write_text("\n".join(lines) + "\n")
    (out / "efficiency_1b.json").write_text(json.dumps({"command": command, "machine": machine, "rows": rows}, indent=2))
    print("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------

def write_report(paper: dict, measured: list[dict], out: Path, command: str, seconds: float) -> None:
    machine = f"{platform.machine()} ({platform.processor() or 'cpu'}), {THREADS} threads, torch {torch.__version__}"
    lines = [f"# Efficiency\n\nCommand: `{command}` ({seconds / 60:.1f} min)  \nMachine: {machine}\n",
             f"## Paper scale: prefill FLOPs, 1 image + {TEXT_TOKENS} text tokens (meta device, eager attention)\n",
             "| model | visual tokens | vision | reducer | projector | LLM | MMoE | total TFLOPs | LLM / closed form | "
             "KV cache per image (bf16) |", "|---|---|---|---|---|---|---|---|---|---|"]
    tera = lambda x: f"{x / 1e12:.2f}"  # noqa: E731
    for name, c in paper.items():
        lines.append(f"| {name} | {c['visual_tokens']} | {tera(c['vision'])} | {tera(c['reducer'])} | "
                     f"{tera(c['projector'])} | {tera(c['llm'])} | {tera(c['mmoe'])} | {tera(c['total'])} | "
                     f"{c['llm_closed_form_ratio']:.4f} | {c['kv_cache_bytes_per_image'] / 2**20:.1f} MiB |")
    leo = paper["LEO-Mini-Llama3-8B (CoTR, 64)"]
    lines.append(f"\nLEO-MINI vs LLaVA-NeXT-8B-style: FLOPs {-100 * leo['reduction_vs_llava_next_total']:+.1f}% with "
                 f"the vision experts, {-100 * leo['reduction_vs_llava_next_without_vision']:+.1f}% without them.\n")

    lines += ["## Measured here (random weights; LLM = SmolLM2-135M shape, vision = ViT-S/16 at 224 px, 196 tokens)\n",
              "Peak RSS: the measuring process's, over the batch/image workloads every model runs (before the "
              "LEO-MINI-only curves, which build models at up to 1024 px).\n",
              "| model | tokens / image | batch | images | prefill ms | prefill vs LEO-MINI full | decode tok/s | "
              "peak RSS (process) |", "|---|---|---|---|---|---|---|---|"]
    full = {(w["batch"], w["images"]): w["prefill_seconds"]
            for r in measured if r["model"] == "leo-mini-full" for w in r["workloads"]}
    for r in measured:
        for w in r["workloads"]:
            ratio = w["prefill_seconds"] / full[(w["batch"], w["images"])] if (w["batch"], w["images"]) in full else None
            lines.append(f"| {r['model']} | {r['tokens_per_image']} | {w['batch']} | {w['images']} | "
                         f"{1000 * w['prefill_seconds']:.0f} | {ratio:.2f}x | {w['decode_tokens_per_second']:.1f} | "
                         f"{r['peak_rss_workloads_mb']:.0f} MB |")
    for r in measured:
        if "overhead" in r:
            o = r["overhead"]
            lines.append(f"\n{r['model']}: CoTR {100 * o['cotr_share']:.2f}% + routers {100 * o['router_share']:.2f}% "
                         f"= {100 * o['overhead_share']:.2f}% of the prefill (batch 1, 1 image; goal < 5%).")
    (out / "efficiency.md").write_text("\n".join(lines) + "\n")
    (out / "efficiency.json").write_text(json.dumps({"command": command, "machine": machine, "paper_scale": paper,
                                                     "measured": measured}, indent=2))
    plot_curves(measured, out)


def plot_curves(measured: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in measured:
        if "images_curve" not in r:
            continue
        label = "LEO-MINI, CoTR 64" if r["model"] == "leo-mini-cotr-64" else "full tokens (no reduction)"
        axes[0].plot([p["images"] for p in r["images_curve"]], [p["prefill_seconds"] for p in r["images_curve"]],
                     marker="o", label=label)
        axes[1].plot([p["expert_tokens"] for p in r["tokens_curve"]], [p["prefill_seconds"] for p in r["tokens_curve"]],
                     marker="o", label=label)
    axes[0].set_xlabel("images per prompt (196 tokens each before reduction)")
    axes[1].set_xlabel("visual tokens per expert (one image)")
    axes[1].set_xscale("log", base=2)
    for axis in axes:
        axis.set_ylabel("prefill seconds (batch 1)")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("Prefill time, SmolLM2-135M-shaped LLM + ViT-S/16 expert, 2 CPU threads")
    figure.tight_layout()
    figure.savefig(out / "efficiency_scaling.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-1b", help=argparse.SUPPRESS)
    parser.add_argument("--billion", action="store_true",
                        help="only the 1B-scale section: LEO-MINI vs LLaVA-1.5 and LLaVA-NeXT, FLOPs, time and memory")
    parser.add_argument("--repeats", type=int, default=2, help="prefill repeats at the 1B scale")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (smoke test, not for the table)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "efficiency")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick)))
        return
    if args.worker_1b:
        print(json.dumps(billion_worker(args.worker_1b, args.repeats)))
        return
    if args.billion:
        args.out.mkdir(parents=True, exist_ok=True)
        measure_billion(args.out, args.repeats)
        return
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    print("paper scale (meta device) ...", flush=True)
    paper = paper_scale()
    print("measuring ...", flush=True)
    measured = measure_all(args.quick)
    command = "python benchmarks/efficiency.py" + (" --quick" if args.quick else "")
    write_report(paper, measured, args.out, command, time.perf_counter() - started)
    print((args.out / "efficiency.md").read_text())


if __name__ == "__main__":
    main()
