"""Which tile does a trained CoTR row's token pick, by the value the question names? For "colour of the <shape>"
questions: CoTR's share on the named tile (mean over its queries, and each query's) and the accuracy, split by the
named shape. A reducer that selects by the question spreads its share evenly over the three shapes; one that is a
fixed shape detector has a high share when its shape is named and a low one otherwise.

    python benchmarks/object_named_share_by_value.py [--row cotr-1] [--questions 150]
    python benchmarks/object_named_share_by_value.py --layout distinct --row cotr-1   # results/object-named/distinct
    python benchmarks/object_named_share_by_value.py --row cotr-1 --seed 1 --kind shape-of-colour
    python benchmarks/object_named_share_by_value.py --elastic-run benchmarks/.work/runs/elastic/seed-0/cotr-elastic

`--elastic-run`: an elastic.py run folder (its trained weights, or its last checkpoint while it trains), measured at
its largest budget. Also reported: how far CoTR's query term spreads over the tokens, per query, against the terms
every query shares (self, text): a query whose own term spreads little attends where the shared terms point.
A row whose reducer has no attention (`avgpool-*`) gets the accuracy by named shape only. For every row: how often
the answer is the colour of a circle, a rectangle or a triangle tile, by the named shape (which shape's colour the
model reports when it is wrong). `--kind shape-of-colour`: "What shape is the <colour> one?" questions instead, split
by the named tile's shape (the answer), with how often each shape is answered.
"""

import argparse
import json
import os
import platform
import shlex
import sys
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import torch

from common import (GRIDS, OBJECT_NAMED_RESULTS, ROOT, assemble_elastic_model, load_object_named_row,
                    load_trained_weights, named_tile_shares, score_term_spreads, write_results)
from leo_mini_hf.easyvqa.dataset import SHAPES
from leo_mini_hf.easyvqa.evaluation import answer_questions, normalise_answer
from leo_mini_hf.easyvqa.object_named import LAYOUTS, object_named_dataset


class QuestionKind(NamedTuple):
    """What `--kind` measures and how its result is worded."""

    question_type: str  # the dataset's question type
    answer: str  # "colour" or "shape"
    wording: str
    grouped_by: str  # what the rows are split by
    answer_spread_heading: str
    answer_spread_key: str  # its JSON key
    answer_spread_note: str
    file_suffix: str  # after share_by_named_shape_<label>


KINDS = {
    "colour-of-shape": QuestionKind(
        "object colour of shape", "colour", "What colour is the <shape>?", "the shape the question names",
        "answered the colour of a circle / rectangle / triangle", "answered_colour_of",
        "*Answered the colour of a …* : the share of answers that are the colour of some tile of that shape "
        "(the named tile's colour counts for the named shape).", ""),
    "shape-of-colour": QuestionKind(
        "object shape of colour", "shape", "What shape is the <colour> one?", "the named tile's shape (the answer)",
        "answered circle / rectangle / triangle", "answered_shape",
        "*Answered …* : the share of answers that are each shape.", "_shape-of-colour"),
}


def answered_shapes(tiles, answered: str, kind: QuestionKind) -> set[str]:
    """The shapes an answer points at: for a colour, the shapes of the tiles of that colour (a reader of one fixed
    shape answers its colour whatever shape is named); for a shape, that shape."""
    if kind.answer == "colour":
        return {tile.shape for tile in tiles if tile.colour == answered}
    return {answered} & set(SHAPES)


def load_elastic_run(run_dir: Path, work_dir: Path, label: str):
    """(model, processor) of an elastic.py run in eval mode, from its trained weights or its last checkpoint."""
    model, processor = assemble_elastic_model(work_dir)
    loaded = load_trained_weights(model, run_dir)
    if loaded is None:
        raise ValueError(f"{run_dir} holds no trained weights and no complete checkpoint")
    print(f"{label}: {loaded}", flush=True)
    return model.eval(), processor


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--row", default="cotr-1")
    parser.add_argument("--elastic-run", type=Path, help="an elastic.py run folder instead of an object_named.py row")
    parser.add_argument("--label", help="the result's name (default: the row, ROW-seedN at a seed other than 0, "
                        "or elastic-<run folder>)")
    parser.add_argument("--questions", type=int, default=150, help="test questions of the kind per grid")
    parser.add_argument("--kind", choices=KINDS, default="colour-of-shape",
                        help="the question type; shape-of-colour groups by the named tile's shape, the answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--layout", choices=LAYOUTS, default="unique", help="the object-named layout of the row and "
                        "its test mosaics (object_named.py --layout)")
    parser.add_argument("--out", type=Path, help="default: results/object-named/unique or results/object-named/distinct")
    args = parser.parse_args()
    args.out = args.out or OBJECT_NAMED_RESULTS[args.layout]
    torch.set_num_threads(2)
    row_label = args.row if args.seed == 0 else f"{args.row}-seed{args.seed}"  # a seed-1 row keeps seed 0's result
    label = args.label or (f"elastic-{args.elastic_run.name}" if args.elastic_run else row_label)
    kind = KINDS[args.kind]
    if args.elastic_run:
        model, processor = load_elastic_run(args.elastic_run, args.work_dir, label)
    else:
        model, processor = load_object_named_row(args.row, args.seed, args.work_dir, args.out)
    has_attention = hasattr(model.token_reducer, "expert_attention")
    result = {}
    for grid in GRIDS:
        dataset = object_named_dataset("test", grid, 6 * args.questions, args.seed, args.layout)
        items = [(index, *dataset.draw_with_named_cell(index)) for index in range(len(dataset))]
        items = [item for item in items if item[4] == kind.question_type][: args.questions]
        samples = [dataset[index] for index, *_ in items]
        predictions = answer_questions(model, processor, samples, batch_size=16)
        shares = named_tile_shares(model, processor, samples, grid, per_query=True) if has_attention \
            else [None] * len(samples)  # [[share per query]]; None without attention
        by_shape = defaultdict(lambda: {"share": [], "correct": [], "answered": defaultdict(int)})
        for (index, tiles, question, answer, _, cell), share, prediction in zip(items, shares, predictions):
            entry, answered = by_shape[tiles[cell].shape], normalise_answer(prediction)
            entry["share"].append(share)
            entry["correct"].append(answered == answer)
            for tile_shape in answered_shapes(tiles, answered, kind):
                entry["answered"][tile_shape] += 1
        spreads = score_term_spreads(model, processor, samples) if has_attention else None
        result[f"{grid}x{grid}"] = {"by_named_shape": {}, "score_term_spread_over_tokens": spreads}
        for shape, entry in sorted(by_shape.items()):
            count = len(entry["correct"])
            summary = {"questions": count, "accuracy": sum(entry["correct"]) / count,
                       kind.answer_spread_key: {value: entry["answered"][value] / count for value in SHAPES}}
            if has_attention:
                per_query = torch.tensor(entry["share"]).mean(dim=0)  # (N_V,): each query's mean share
                summary |= {"named_share": per_query.mean().item(), "named_share_per_query": per_query.tolist()}
            result[f"{grid}x{grid}"]["by_named_shape"][shape] = summary
        print(grid, json.dumps(result[f"{grid}x{grid}"]), flush=True)
    command = shlex.join(["python", "benchmarks/object_named_share_by_value.py", *sys.argv[1:]])
    title = "the reducer's attention share on the named tile and accuracy" if has_attention else "accuracy"
    lines = [f"# {label}: {title}, by {kind.grouped_by}", "",
             f"Command: `{command}`  ", f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch "
             f"{torch.__version__}  ", f"\"{kind.wording}\", the first {args.questions} such test "
             f"questions per grid (seed {args.seed}); uniform share: 1/4 (2×2), 1/9 (3×3).", "",
             kind.answer_spread_note, "",
             f"| grid | named tile's shape | questions | named-tile share | share per query | accuracy | "
             f"{kind.answer_spread_heading} |",
             "|---|---|---|---|---|---|---|"]
    for grid, entries in result.items():
        for shape, entry in entries["by_named_shape"].items():
            per_query = " / ".join(f"{share:.2f}" for share in entry["named_share_per_query"]) if has_attention \
                else "– (no attention)"
            named_share = f"{entry['named_share']:.3f}" if has_attention else "–"
            answered = " / ".join(f"{entry[kind.answer_spread_key][value]:.2f}" for value in SHAPES)
            lines.append(f"| {grid} | {shape} | {entry['questions']} | {named_share} | {per_query} | "
                         f"{entry['accuracy']:.2f} | {answered} |")
    if has_attention:
        lines += ["", "How far CoTR's score terms spread over the expert's tokens (standard deviation over tokens, "
                  "mean over these questions): the query term per query, and the terms all queries share.", "",
                  "| grid | query term, per query | self | text | text, question part |", "|---|---|---|---|---|"]
        for grid, entries in result.items():
            spread = entries["score_term_spread_over_tokens"]
            per_query = " / ".join(f"{value:.2f}" for value in spread["query_per_query"])
            text, question_part = (f"{spread['text']:.2f}", f"{spread['text_question_part']:.3f}") \
                if "text" in spread else ("– (no text term)", "–")
            lines.append(f"| {grid} | {per_query} | {spread['self']:.2f} | {text} | {question_part} |")
    name = f"share_by_named_shape_{label}{kind.file_suffix}"
    write_results(args.out / name, {"command": command, "row": label, "kind": args.kind, "result": result}, lines)


if __name__ == "__main__":
    main()
