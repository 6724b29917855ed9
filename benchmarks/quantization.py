"""Quantized LEO-MINI-Smol on CPU: memory and answers per backend, against the float32 model.

LEO-MINI's own modules (CoTR, projector, whole MMoE layers) stay unquantized under every backend
(`trained_module_patterns`); the LLM's other linears (and the expert's, where it has any) are quantized.

    python benchmarks/quantization.py [--questions 100]
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


def quantization_config(backend: str):
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    if backend == "torchao-int8-weight-only":
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    return {"quanto-int8": lambda: QuantoConfig(weights="int8"), "quanto-int4": lambda: QuantoConfig(weights="int4"),
            "bitsandbytes-int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
            "bitsandbytes-nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}[backend]()


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
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization" / "quantization"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = demo_checkpoint()
    processor = LeoMiniProcessor.from_pretrained(folder)
    test = EasyVQADataset("test")
    samples = [test[i] for i in evaluation_subset(test, args.questions, seed=0)]
    demo = bundled_chat_samples()
    rows, reference = [], None
    for backend in BACKENDS:
        kwargs = {} if backend == "float32" else {"quantization_config": quantization_config(backend),
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
        }
        rows.append(row)
        print(row, flush=True)
        del model
        gc.collect()
    command = shlex.join(["python", "benchmarks/quantization.py", *sys.argv[1:]])
    lines = ["# Quantized LEO-MINI-Smol on CPU", "", f"Command: `{command}`  ",
             f"{args.questions} seeded easy-vqa test questions + the 6 bundled demo questions, greedy; memory: "
             "the bytes parameters and buffers hold (quantized tensors: their int data and scales). CoTR, projector and MMoE "
             "layers stay float32 in every row.", "",
             "| backend | memory (MB) | easy-vqa accuracy | demo questions right | answers equal to float32 |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['memory_mb']} | {r['easy_vqa_accuracy']:.3f} | {r['demo_correct']}/6 | "
                     f"{r['agreement_with_float32']:.3f} |")
    from pathlib import Path

    write_results(Path(args.out), {"command": command, "results": rows}, lines)


if __name__ == "__main__":
    main()
