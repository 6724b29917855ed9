"""How much of CoTR's summed text condition is the chat template, and how much depends on the question?

CoTR's text term is visual · W · Σ_t T_t over the prompt's text tokens (`cotr_text_source="prompt"`) or over the user's
words only (`"user"`). This script takes the object-named test questions, renders them as evaluation does, and
measures with LEO-MINI-Smol's (frozen) SmolLM2 token embeddings, per grid and question type:

- the text tokens each source sums (template tokens are the difference);
- the norm of each sum, and the share of its energy that is the same for every question (‖mean Σ‖² / mean ‖Σ‖²);
- the spread of the sum over questions (RMS ‖Σ − mean Σ‖): the only part that can make CoTR's scores differ between
  questions. The text term is linear in Σ, so with one fixed template this spread is the same for both sources.

No training and no trained weights: only the embedding table.

    python benchmarks/object_named_text_sum.py [--questions 150]
"""

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

from common import GRIDS, ROOT, write_results
from leo_mini_hf.conversion.smol import assemble_leo_mini_smol
from leo_mini_hf.easyvqa.evaluation import prompt_inputs
from leo_mini_hf.easyvqa.object_named import ANSWERS, ObjectNamedMosaicDataset
from leo_mini_hf.modeling.token_reduction import prompt_text_mask
from leo_mini_hf.processor import LeoMiniProcessor


def text_sums(model, processor, samples) -> dict:
    """Per source: (questions, d) sums of the text-token embeddings and the tokens summed per question."""
    inputs = prompt_inputs(processor, samples)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).float()
    prompt = prompt_text_mask(inputs["input_ids"], embeds, inputs["attention_mask"], None, processor.image_token_id)
    masks = {"prompt": prompt, "user": prompt & inputs["text_condition_mask"].bool()}
    return {source: ((embeds * mask.unsqueeze(-1)).sum(dim=1), mask.sum(dim=1).float())
            for source, mask in masks.items()}


def summary(sums: torch.Tensor, tokens: torch.Tensor) -> dict:
    mean = sums.mean(dim=0)
    return {"tokens": round(float(tokens.mean()), 1), "norm": round(float(sums.norm(dim=1).mean()), 3),
            "constant_energy_share": round(float(mean.norm() ** 2 / (sums.norm(dim=1) ** 2).mean()), 4),
            "question_spread": round(float((sums - mean).norm(dim=1).pow(2).mean().sqrt()), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=150, help="test questions per grid (a third per type)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "object-named" / "unique")
    args = parser.parse_args()
    model, processor = assemble_leo_mini_smol(args.work_dir / "parts", num_visual_tokens=1)
    user_processor = LeoMiniProcessor(processor.image_processor, processor.tokenizer,
                                      chat_template=processor.chat_template, num_image_tokens=1,
                                      cotr_text_source="user")
    results = {}
    with torch.no_grad():
        for grid in GRIDS:
            dataset = ObjectNamedMosaicDataset("test", grid, size=args.questions, seed=args.seed)
            samples = [dataset[index] for index in range(len(dataset))]
            for kind in ANSWERS:
                chosen = [sample for sample in samples if sample["question_type"] == kind]
                sums = text_sums(model, user_processor, chosen)
                results[f"{grid}x{grid} {kind}"] = {"questions": len(chosen),
                                                    **{source: summary(*value) for source, value in sums.items()}}
    command = shlex.join(["python", "benchmarks/object_named_text_sum.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = ["# CoTR's text condition on the object-named questions: template against question", "",
             f"Command: `{command}`  ", f"Machine: {machine}", "",
             "SmolLM2-135M token embeddings summed over the prompt's text tokens (`cotr_text_source=\"prompt\"`) or "
             "the user's words only (`\"user\"`). *constant share*: the share of the sum's energy that is the same "
             "for every question (‖mean Σ‖² / mean ‖Σ‖²); *question spread*: RMS ‖Σ − mean Σ‖ over the questions, "
             "the only part of the text term that can differ between questions.", "",
             "| grid and type | questions | tokens prompt / user | ‖Σ‖ prompt / user | constant share prompt / user | "
             "question spread prompt / user |", "|---|---|---|---|---|---|"]
    for name, row in results.items():
        prompt, user = row["prompt"], row["user"]
        lines.append(f"| {name} | {row['questions']} | {prompt['tokens']} / {user['tokens']} | {prompt['norm']:.2f} / "
                     f"{user['norm']:.2f} | {prompt['constant_energy_share']:.3f} / "
                     f"{user['constant_energy_share']:.3f} | {prompt['question_spread']:.3f} / "
                     f"{user['question_spread']:.3f} |")
    write_results(args.out / "text_sum", {"command": command, "machine": machine, "results": results}, lines)


if __name__ == "__main__":
    main()
