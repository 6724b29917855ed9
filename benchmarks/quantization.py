"""Quantized LEO-MINI-Smol on CPU: memory and answers per backend, against the float32 model.

LEO-MINI's own modules (CoTR, projector, the MMoE adapters and routers) stay unquantized under every backend
(`trained_module_patterns`); the LLM's linears, the MMoE layers' base linears among them, are quantized (and the
expert's, where it has any).

    python benchmarks/quantization.py [--questions 100]
    python benchmarks/quantization.py --backends float32 quanto-int4 bitsandbytes-nf4 --skip base_linear lm_head \
        --out benchmarks/results/quantization/mmoe-base-unquantized/quantization

`--skip` leaves modules unquantized by name (the backends' `modules_to_not_convert` / `llm_int8_skip_modules`;
`base_linear` names the MMoE layers' base linears): a probe of which layers the quantization error comes from.
"""

import argparse
import gc
import shlex
import sys

import torch

from common import ROOT, write_results
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.demo import bundled_chat_samples, demo_checkpoint
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.easyvqa.evaluation import answer_questions, evaluation_subset, normalise_answer
from leo_mini_hf.modeling.mmoe import MMoELinear


def quantization_config(backend: str, skip: list[str] | None = None):
    """transformers' config for `backend`; `skip`: module names to leave unquantized (None: the backend's default)."""
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if backend == "torchao-int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    bnb_skip = {"llm_int8_skip_modules": skip} if skip is not None else {}
    return {"quanto-int8": lambda: QuantoConfig(weights="int8", modules_to_not_convert=skip),
            "quanto-int4": lambda: QuantoConfig(weights="int4", modules_to_not_convert=skip),
            "bitsandbytes-int8": lambda: BitsAndBytesConfig(load_in_8bit=True, **bnb_skip),
            "bitsandbytes-nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           **bnb_skip)}[backend]()


def mmoe_base_linear_kind(model) -> str:
    """What a backend made of the MMoE layers' base linears: their module class, and the weight's class where a
    backend swaps the tensor (torchao)."""
    kinds = set()
    for module in model.modules():
        if isinstance(module, MMoELinear):
            weight = module.base_linear.weight
            kinds.add(f"{type(module.base_linear).__name__} ({type(weight).__name__}, {weight.dtype})")
    return ", ".join(sorted(kinds))


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, also for quantized tensor subclasses (torchao, quanto): the sum over their inner tensors
    (`__tensor_flatten__`), e.g. int8 data plus scales. `get_memory_footprint()` counts those at the outer dtype."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def model_megabytes(model) -> float:
    tensors = {id(t): t for t in [*(p.data for p in model.parameters()), *model.buffers()]}  # tied weights once
    return sum(stored_bytes(tensor) for tensor in tensors.values()) / 2**20


BACKENDS = ["float32", "torchao-int8-weight-only", "quanto-int8", "quanto-int4", "bitsandbytes-int8",
            "bitsandbytes-nf4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=100, help="seeded easy-vqa test sample")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS,
                        help="float32 first: the other rows are compared with it")
    parser.add_argument("--skip", nargs="+", default=None, help="module names every backend leaves unquantized")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization" / "quantization"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = demo_checkpoint()
    processor = LeoMiniProcessor.from_pretrained(folder)
    test = EasyVQADataset("test")
    samples = [test[i] for i in evaluation_subset(test, args.questions, seed=0)]
    demo = bundled_chat_samples()
    rows, reference = [], None
    if args.backends[0] != "float32":
        parser.error("--backends must start with float32: the other rows are compared with its answers")
    for backend in args.backends:
        kwargs = {} if backend == "float32" else {"quantization_config": quantization_config(backend, args.skip),
                                                  "device_map": "cpu"}
        model = LeoMiniForConditionalGeneration.from_pretrained(folder, **kwargs).eval()
        answers = [normalise_answer(a) for a in answer_questions(model, processor, samples + demo, batch_size=16)]
        reference = reference or answers
        row = {
            "backend": backend,
            "memory_mb": round(model_megabytes(model), 1),
            "easy_vqa_accuracy": sum(a == s["answer"] for a, s in zip(answers, samples)) / len(samples),
            "demo_correct": sum(a == s["answer"] for a, s in zip(answers[len(samples):], demo)),
            "agreement_with_float32": sum(a == r for a, r in zip(answers, reference)) / len(answers),
            "own_modules_dtype": str(model.token_reducer.queries.dtype),
            "mmoe_adapter_dtype": str(next(m for m in model.modules() if isinstance(m, MMoELinear)).general_lora_A.dtype),
            "mmoe_base_linear": mmoe_base_linear_kind(model),
        }
        rows.append(row)
        print(row, flush=True)
        del model
        gc.collect()
    command = shlex.join(["python", "benchmarks/quantization.py", *sys.argv[1:]])
    lines = ["# Quantized LEO-MINI-Smol on CPU", "", f"Command: `{command}`  ",
             f"{args.questions} seeded easy-vqa test questions + the 6 bundled demo questions, greedy; memory: "
             "the bytes parameters and buffers hold (quantized tensors: their int data and scales). CoTR, the projector and "
             "the MMoE adapters and routers stay float32 in every row; the MMoE base linears are quantized like the "
             "LLM's other linears (last column)."
             + (f" Left unquantized by name (`--skip`): {', '.join(args.skip)}." if args.skip else ""), "",
             "| backend | memory (MB) | easy-vqa accuracy | demo questions right | answers equal to float32 | "
             "MMoE base linear (weight) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['memory_mb']} | {r['easy_vqa_accuracy']:.3f} | {r['demo_correct']}/6 | "
                     f"{r['agreement_with_float32']:.3f} | {r['mmoe_base_linear']} |")
    from pathlib import Path

    write_results(Path(args.out), {"command": command, "results": rows}, lines)


if __name__ == "__main__":
    main()
