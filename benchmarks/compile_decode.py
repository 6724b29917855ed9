"""Does `torch.compile` speed up LEO-MINI-Smol's decoding on CPU, and does it change any token? Greedy generation with
a static KV cache, eager vs the LLM's forward compiled (inductor), at batch 1 and 8; graph breaks of one decode step
from `torch._dynamo.explain`.

    python benchmarks/compile_decode.py --out benchmarks/results/compile_decode/compile_decode
"""

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from common import write_results
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.demo import bundled_chat_samples, demo_checkpoint
from leo_mini_hf.easyvqa.evaluation import prompt_inputs
from leo_mini_hf.modeling.modeling_leo_mini import CACHE_NAME


def batch_inputs(processor, batch: int) -> dict:
    samples = bundled_chat_samples()
    return prompt_inputs(processor, (samples * batch)[:batch])


@torch.no_grad()
def timed_generate(model, inputs, new_tokens: int) -> tuple[torch.Tensor, float, float]:
    """(tokens, prefill seconds, decode tokens per second), static cache, greedy, exactly `new_tokens` new tokens."""
    started = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1, do_sample=False, cache_implementation="static")
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    tokens = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                            cache_implementation="static")
    decode = time.perf_counter() - started - prefill
    return tokens, prefill, inputs["input_ids"].shape[0] * (new_tokens - 1) / decode


@torch.no_grad()
def decode_step_graph_breaks(model, inputs) -> dict:
    prefill = model(**{k: v[:1] for k, v in inputs.items() if k != "pixel_values"},
                    pixel_values=inputs["pixel_values"][:1], use_cache=True)
    step = {"input_ids": torch.tensor([[17]]), "routing_context": prefill.routing_context, "use_cache": True,
            CACHE_NAME: getattr(prefill, CACHE_NAME)}
    explanation = torch._dynamo.explain(model)(**step)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "reasons": [str(reason.reason)[:200] for reason in explanation.break_reasons]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, help="a LEO-MINI checkpoint (default: the demo's LEO-MINI-Smol)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_decode/compile_decode"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or demo_checkpoint()
    processor = LeoMiniProcessor.from_pretrained(folder)
    model = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    rows = []
    breaks = decode_step_graph_breaks(model, batch_inputs(processor, 1))
    eager_forward = model.language_model.forward
    for batch in (1, 8):
        inputs = batch_inputs(processor, batch)
        model.language_model.forward = eager_forward
        eager_tokens, eager_prefill, eager_rate = timed_generate(model, inputs, args.new_tokens)
        model.language_model.forward = torch.compile(eager_forward, dynamic=False)
        started = time.perf_counter()
        timed_generate(model, inputs, 2)  # compiles: prefill and decode shapes
        compile_seconds = time.perf_counter() - started
        compiled_tokens, compiled_prefill, compiled_rate = timed_generate(model, inputs, args.new_tokens)
        rows.append({"batch": batch, "eager_decode_tokens_per_second": eager_rate,
                     "compiled_decode_tokens_per_second": compiled_rate, "speedup": compiled_rate / eager_rate,
                     "eager_prefill_seconds": eager_prefill, "compiled_prefill_seconds": compiled_prefill,
                     "compile_seconds": compile_seconds,
                     "identical_tokens": eager_tokens.tolist() == compiled_tokens.tolist()})
        print(rows[-1], flush=True)
    command = shlex.join(["python", "benchmarks/compile_decode.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = [f"# torch.compile and decoding, LEO-MINI-Smol, static cache, greedy, {args.new_tokens} new tokens", "",
             f"`{command}` ({machine}); the LLM's forward compiled with inductor (`dynamic=False`).", "",
             f"One decode step under `torch._dynamo.explain`: {breaks['graphs']} graph(s), {breaks['graph_breaks']} "
             "graph break(s).", "",
             "| batch | eager tok/s | compiled tok/s | speed-up | compile s | identical greedy tokens |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['eager_decode_tokens_per_second']:.1f} | "
              f"{r['compiled_decode_tokens_per_second']:.1f} | {r['speedup']:.2f}x | {r['compile_seconds']:.0f} | "
              f"{r['identical_tokens']} |" for r in rows]
    write_results(args.out, {"command": command, "machine": machine, "decode_step": breaks, "rows": rows}, lines)


if __name__ == "__main__":
    main()
