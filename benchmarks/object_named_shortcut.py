"""Does the question or the image pick the tile? A probe of object-named rows trained by object_named.py.

"What colour is the <shape>?" has exactly one tile of that shape. On a 3×3 mosaic the other 8 tiles share the other
two shapes, so the named tile is almost always the only tile whose shape is unique: a model can find it without
reading the question. This script measures that shortcut and whether trained rows use it:

- *odd-one-out rule* (no model): answer with the asked attribute of a random tile among those whose naming attribute
  (the shape for "colour of the <shape>", the colour for "shape of the <colour> one") is unique in the mosaic;
- for each trained row (its `trained.safetensors` in the work folder), on the same test questions: accuracy and
  CoTR's share on the named tile with the true question; with CoTR's text condition set to zero (the LLM still reads
  the question); and with a *counterfactual* question that names another value present in the mosaic more than once
  (scored against the original answer: a model that still gives it ignores the word that names the tile).

    python benchmarks/object_named_shortcut.py [--rows cotr-1 avgpool-1] [--questions 100]
    python benchmarks/object_named_shortcut.py --rows cotr-cos-1 --name shortcut_cotr-cos-1   # its own result files
"""

import argparse
import json
import os
import platform
import random
import shlex
import sys
from collections import Counter
from pathlib import Path

import torch

from common import (GRIDS, ROOT, display_path, load_object_named_row, named_tile_shares, score_term_spreads,
                    write_results)
from leo_mini_hf.easyvqa.evaluation import answer_questions, normalise_answer
from leo_mini_hf.easyvqa.object_named import ObjectNamedMosaicDataset
from leo_mini_hf.modeling.token_reduction import ConditionalTokenReduction

TYPES = {"object colour of shape": ("shape", "colour"), "object shape of colour": ("colour", "shape")}  # naming, asked


def odd_one_out_accuracy(tiles, answer: str, naming: str, asked: str) -> float:
    counts = Counter(getattr(tile, naming) for tile in tiles)
    unique = [tile for tile in tiles if counts[getattr(tile, naming)] == 1]
    return sum(getattr(tile, asked) == answer for tile in unique) / len(unique)


def counterfactual_question(question: str, tiles, named_value: str, naming: str, rng: random.Random) -> str | None:
    """The question naming another value of the naming attribute that shows on more than one tile (None if none)."""
    counts = Counter(getattr(tile, naming) for tile in tiles)
    others = sorted(value for value, count in counts.items() if value != named_value and count > 1)
    return question.replace(f" {named_value}", f" {rng.choice(others)}", 1) if others else None


def probe_samples(grid: int, questions: int, seed: int) -> dict:
    """Per question type: the first `questions` test samples with their tiles, named value, a counterfactual."""
    dataset = ObjectNamedMosaicDataset("test", grid, size=3 * questions * 2, seed=seed)
    rng = random.Random(f"counterfactual/{grid}/{seed}")
    by_type = {kind: [] for kind in TYPES}
    for index in range(len(dataset)):
        tiles, question, answer, kind, cell = dataset.draw_with_named_cell(index)
        if kind not in TYPES or len(by_type[kind]) >= questions:
            continue
        naming, asked = TYPES[kind]
        named_value = getattr(tiles[cell], naming)
        sample = dataset[index]
        counterfactual = counterfactual_question(question, tiles, named_value, naming, rng)
        by_type[kind].append({"sample": sample, "tiles": tiles, "answer": answer, "cell": cell,
                              "odd_one_out": odd_one_out_accuracy(tiles, answer, naming, asked),
                              "counterfactual": counterfactual})
    return by_type


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def with_question(sample: dict, question: str) -> dict:
    messages = [{**message, "content": [{**block, "text": question} if block.get("type") == "text" else block
                                        for block in message["content"]]} if message["role"] == "user" else message
                for message in sample["messages"]]
    return {**sample, "messages": messages}


class ZeroTextCondition:
    """Within the block, CoTR is conditioned on a zero prompt-text sum (the LLM still reads the question)."""

    def __init__(self, reducer):
        self.reducer, self.handle = reducer, None

    def __enter__(self):
        def zero_text(module, args, kwargs):
            return (args[0], torch.zeros_like(args[1]), *args[2:]), kwargs

        self.handle = self.reducer.register_forward_pre_hook(zero_text, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def accuracy(model, processor, samples: list[dict], answers: list[str]) -> float:
    predictions = answer_questions(model, processor, samples, batch_size=16)
    return sum(normalise_answer(p) == a for p, a in zip(predictions, answers)) / len(answers)


def probe_row(name: str, args, probes: dict) -> dict:
    model, processor = load_object_named_row(name, args.seed, args.work_dir, args.out)
    is_cotr = isinstance(model.token_reducer, ConditionalTokenReduction)
    result = {}
    for grid, by_type in probes.items():
        for kind, items in by_type.items():
            samples = [item["sample"] for item in items]
            answers = [item["answer"] for item in items]
            counterfactual = [item for item in items if item["counterfactual"]]
            entry = {"questions": len(items), "true_question": accuracy(model, processor, samples, answers),
                     "counterfactual_questions": len(counterfactual),
                     "counterfactual_gives_original_answer": accuracy(
                         model, processor, [with_question(i["sample"], i["counterfactual"]) for i in counterfactual],
                         [i["answer"] for i in counterfactual]) if counterfactual else None}
            if is_cotr:
                with ZeroTextCondition(model.token_reducer):
                    entry["cotr_text_zeroed"] = accuracy(model, processor, samples, answers)
                entry["named_share"] = mean(named_tile_shares(model, processor, samples, grid))
                entry["named_share_text_zeroed"] = mean(named_tile_shares(model, processor, samples, grid,
                                                                          zero_text=True))
                entry["score_term_spread_over_tokens"] = score_term_spreads(model, processor, samples)
                entry["named_share_counterfactual"] = mean(named_tile_shares(
                    model, processor, [with_question(i["sample"], i["counterfactual"]) for i in counterfactual],
                    grid)) if counterfactual else None
            result[f"{grid}x{grid} {kind}"] = entry
            print(name, grid, kind, json.dumps(entry), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="*", default=["cotr-1", "avgpool-1"])
    parser.add_argument("--questions", type=int, default=100, help="test questions per type and grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "object-named" / "unique")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="shortcut", help="the result files' name in --out (default: shortcut)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    probes = {grid: probe_samples(grid, args.questions, args.seed) for grid in GRIDS}
    rule = {f"{grid}x{grid} {kind}": sum(item["odd_one_out"] for item in items) / len(items)
            for grid, by_type in probes.items() for kind, items in by_type.items()}
    rows = {name: probe_row(name, args, probes) for name in args.rows}
    command = shlex.join(["python", "benchmarks/object_named_shortcut.py", *sys.argv[1:]])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    lines = ["# Object-named mosaics: does the question or the image pick the tile?", "", f"Command: `{command}`  ",
             f"Machine: {machine}  ",
             f"The first {args.questions} test questions of each type and grid (seed {args.seed}). "
             "*odd-one-out rule*: the asked attribute of a random tile whose naming attribute is unique in the "
             "mosaic (no model, no question). *text zeroed*: CoTR conditioned on a zero text sum, the LLM still "
             "reads the question. *counterfactual*: the question names another value present on more than one "
             "tile; scored against the original answer.", "",
             "| question | odd-one-out rule | row | true question | CoTR text zeroed | counterfactual → original "
             "answer | named-tile share: true / text zeroed / counterfactual |", "|---|---|---|---|---|---|---|"]
    for key, rule_accuracy in rule.items():
        for name, result in rows.items():
            entry = result[key]
            shares = (" / ".join(f"{entry[k]:.3f}" if entry.get(k) is not None else "–" for k in
                                 ("named_share", "named_share_text_zeroed", "named_share_counterfactual"))
                      if "named_share" in entry else "–")
            zeroed = f"{entry['cotr_text_zeroed']:.2f}" if "cotr_text_zeroed" in entry else "–"
            counterfactual = entry["counterfactual_gives_original_answer"]
            lines.append(f"| {key} | {rule_accuracy:.2f} | {name} | {entry['true_question']:.2f} | {zeroed} | "
                         f"{'–' if counterfactual is None else f'{counterfactual:.2f}'} "
                         f"({entry['counterfactual_questions']}) | {shares} |")
    spread_rows = [(key, name, result[key]["score_term_spread_over_tokens"]) for key in rule
                   for name, result in rows.items() if "score_term_spread_over_tokens" in result[key]]
    if spread_rows:
        lines += ["", "How far each of CoTR's score terms spreads over the expert's tokens (standard deviation over "
                  "tokens, mean over questions and queries; the softmax follows the total, and a term with a small "
                  "spread cannot move it). *text, question part*: the text term of each prompt's text sum minus the "
                  "mean text sum of its batch of 16, what the question itself adds:", "",
                  "| question | row | query | self | cross | text | text, question part | total |",
                  "|---|---|---|---|---|---|---|---|"]
        for key, name, spread in spread_rows:
            lines.append(f"| {key} | {name} | " + " | ".join(f"{spread[term]:.4f}" for term in
                                                           ("query", "self", "cross", "text", "text_question_part",
                                                            "total")) + " |")
    write_results(args.out / args.name, {"command": command, "machine": machine, "odd_one_out_rule": rule,
                                         "rows": rows}, lines)
    print(f"written {display_path(args.out / f'{args.name}.md')}")


if __name__ == "__main__":
    main()
