"""Probe: where LEO-MINI's batch-1 decode time goes beside LLaVA (SmolLM2 shape, LEO-MINI-Smol's adapter sizes with
the per-layer routers every checkpoint had before `mmoe_router_context`, float32, random weights with non-zero LoRA B
so every term computes).

The MMoE layer's forward is swapped for variants, in alternating rounds with LLaVA (decode tok/s as in memory.py):
- `as built`: today's `MMoELinear.forward` (each LoRA product one `F.linear`);
- `einsum LoRA`: the forward before it, the routed LoRA as two einsums;
- `fused LoRA`: general and routed LoRA as one pair of matmuls (A and B concatenated, the routing weights as gates);
- `fused, no general LoRA`: what a model whose general LoRA is merged into the base weight would compute per step;
- `router only`: the base linear plus the router (no LoRA terms);
- `no MMoE`: the base linear alone.

    python benchmarks/mmoe_decode_probe.py [--rounds 6]    # → benchmarks/results/memory/mmoe_decode_probe.{json,md}
"""

import argparse
import shlex
import statistics
import sys
from pathlib import Path

import torch

from common import ROOT, write_results
from leo_mini_hf.modeling.mmoe import MMoELinear
from memory import THREADS, build, decode_tokens_per_second, prompt_inputs, ratio_mean_and_error

AS_BUILT = MMoELinear.forward


def concatenated_lora(layer: MMoELinear, general: bool):
    """(A (k·r, in), B (out, k·r)) of the general (if `general`) and routed LoRA, expert-major."""
    lora_A = layer.experts_lora_A.flatten(0, 1)
    lora_B = layer.experts_lora_B.permute(1, 0, 2).flatten(1)
    if general:
        lora_A = torch.cat([layer.general_lora_A, lora_A])
        lora_B = torch.cat([layer.general_lora_B, lora_B], dim=1)
    return lora_A, lora_B


def fused_forward(general: bool):
    def forward(self, hidden_states):
        weights = self.expert_weights(hidden_states)  # (B, T|1, E)
        if general:
            weights = torch.cat([weights.new_ones(weights.shape[:-1] + (1,)), weights], dim=-1)
        gates = weights.repeat_interleave(self.general_lora_A.shape[0], dim=-1)
        lora_A, lora_B = concatenated_lora(self, general)
        return self.base_linear(hidden_states) + self.scaling * (((hidden_states @ lora_A.T) * gates) @ lora_B.T)
    return forward


def einsum_forward(self, hidden_states):
    """`MMoELinear.forward` as it was before #43 made each LoRA product one `F.linear` (float32, eval)."""
    general = (hidden_states @ self.general_lora_A.T) @ self.general_lora_B.T
    output = self.base_linear(hidden_states) + self.scaling * general
    weights = self.expert_weights(hidden_states)
    expert_hidden = torch.einsum("bti,eri->bter", hidden_states, self.experts_lora_A) * weights.unsqueeze(-1)
    return output + self.scaling * torch.einsum("bter,eor->bto", expert_hidden, self.experts_lora_B)


def router_only(self, hidden_states):
    self.expert_weights(hidden_states)
    return self.base_linear(hidden_states)


def base_only(self, hidden_states):
    return self.base_linear(hidden_states)


VARIANTS = {"as built": AS_BUILT, "einsum LoRA": einsum_forward, "fused LoRA": fused_forward(general=True),
            "fused, no general LoRA": fused_forward(general=False), "router only": router_only, "no MMoE": base_only}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory" / "mmoe_decode_probe"))
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    leo, leo_tokens = build("smol", "leo-mini-per-layer-router")  # the router its variants call with x
    llava, llava_tokens = build("smol", "llava")
    for module in leo.modules():
        if isinstance(module, MMoELinear):
            torch.nn.init.normal_(module.general_lora_B, std=0.01)
            torch.nn.init.normal_(module.experts_lora_B, std=0.01)
    leo_inputs, llava_inputs = prompt_inputs("smol", leo_tokens), prompt_inputs("smol", llava_tokens)
    with torch.no_grad():
        reference = leo(**leo_inputs).logits
        MMoELinear.forward = VARIANTS["fused LoRA"]
        fused_difference = (leo(**leo_inputs).logits - reference).abs().max().item()
        MMoELinear.forward = AS_BUILT

    decode_tokens_per_second(leo, leo_inputs), decode_tokens_per_second(llava, llava_inputs)  # warm-up
    speeds = {name: [] for name in [*VARIANTS, "LLaVA"]}
    for _ in range(args.rounds):
        for name, forward in VARIANTS.items():
            MMoELinear.forward = forward
            speeds[name].append(decode_tokens_per_second(leo, leo_inputs))
        MMoELinear.forward = AS_BUILT
        speeds["LLaVA"].append(decode_tokens_per_second(llava, llava_inputs))
    rows = []
    for name, values in speeds.items():
        ratio_mean, ratio_error = ratio_mean_and_error(values, speeds["LLaVA"])
        rows.append({"variant": name, "median_tokens_per_second": statistics.median(values),
                     "ratio_mean": ratio_mean, "ratio_standard_error": ratio_error})
    command = shlex.join(["python", "benchmarks/mmoe_decode_probe.py", *sys.argv[1:]])
    lines = ["# Where LEO-MINI's batch-1 decode time goes (probe)\n", f"Command: `{command}`  ",
             f"SmolLM2 shape, float32, batch 1, {args.rounds} alternating rounds; the fused LoRA's logits differ from "
             f"the layer's by at most {fused_difference:.1e}.\n",
             "| MMoE layer forward | tok/s (median) | / LLaVA (mean ± SE) |", "|---|---|---|"]
    lines += [f"| {r['variant']} | {r['median_tokens_per_second']:.1f} | {r['ratio_mean']:.3f} ± "
              f"{r['ratio_standard_error']:.3f} |" for r in rows]
    write_results(Path(args.out), {"command": command, "fused_max_logit_difference": fused_difference,
                                   "rows": rows, "tokens_per_second": speeds}, lines)


if __name__ == "__main__":
    main()
