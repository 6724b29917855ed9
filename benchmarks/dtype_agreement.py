"""How far do LEO-MINI-Smol's answers move in bfloat16 and float16? Logit differences against float32 and greedy
answer agreement on easy-vqa test questions, the model loaded with `from_pretrained(..., dtype=...)` and fed the
processor's float32 pixels (cast inside the model).

    python benchmarks/dtype_agreement.py --questions 100 --out benchmarks/results/dtype_agreement/dtype_agreement
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
from leo_mini_hf.demo import demo_checkpoint
from leo_mini_hf.dtypes import DTYPES
from leo_mini_hf.easyvqa.dataset import EasyVQADataset
from leo_mini_hf.easyvqa.evaluation import answer_questions, evaluation_subset, normalise_answer, prompt_inputs


@torch.no_grad()
def last_logits(model, processor, samples) -> torch.Tensor:
    """(questions, vocab) float32 logits of the first answer token, one prompt at a time."""
    rows = []
    for sample in samples:
        rows.append(model(**prompt_inputs(processor, [sample]), logits_to_keep=1).logits[0, -1].float())
    return torch.stack(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/dtype_agreement/dtype_agreement"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = demo_checkpoint()
    processor = LeoMiniProcessor.from_pretrained(folder)
    dataset = EasyVQADataset("test")
    samples = [dataset[i] for i in evaluation_subset(dataset, args.questions, args.seed)]
    truth = [sample["answer"] for sample in samples]
    results = {}
    for name, dtype in DTYPES.items():
        model = LeoMiniForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
        started = time.perf_counter()
        logits = last_logits(model, processor, samples)
        answers = [normalise_answer(a) for a in answer_questions(model, processor, samples, batch_size=16)]
        results[name] = {"logits": logits, "answers": answers, "seconds": time.perf_counter() - started,
                         "accuracy": sum(a == t for a, t in zip(answers, truth)) / len(truth)}
    reference = results["float32"]
    rows = []
    for name, result in results.items():
        difference = (result["logits"] - reference["logits"]).abs()
        rows.append({
            "dtype": name,
            "max_abs_logit_difference": difference.max().item(),
            "mean_abs_logit_difference": difference.mean().item(),
            "top1_first_token_agreement": (result["logits"].argmax(-1) == reference["logits"].argmax(-1))
            .float().mean().item(),
            "answer_agreement": sum(a == b for a, b in zip(result["answers"], reference["answers"])) / len(truth),
            "accuracy": result["accuracy"],
            "seconds": result["seconds"],
        })
    command = shlex.join(["python", "benchmarks/dtype_agreement.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}"
    lines = [f"# LEO-MINI-Smol in half precision vs float32 ({len(samples)} easy-vqa test questions)", "",
             f"`{command}` ({machine})", "",
             "| dtype | max abs logit diff | mean abs logit diff | first-token top-1 agreement | answer agreement | "
             "accuracy | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['max_abs_logit_difference']:.3f} | {r['mean_abs_logit_difference']:.4f} | "
              f"{r['top1_first_token_agreement']:.3f} | {r['answer_agreement']:.3f} | {r['accuracy']:.3f} | "
              f"{r['seconds']:.1f} |" for r in rows]
    write_results(args.out, {"command": command, "machine": machine, "questions": len(samples), "rows": rows}, lines)


if __name__ == "__main__":
    main()
