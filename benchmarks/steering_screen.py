"""Reducer-only screen (#41 part 1a): with a direct answer signal, does CoTR's own scoring select the object a
question names?

No LLM in the loop: a fresh one-query CoTR (the project's `ConditionalTokenReduction`, LEO-MINI-Smol's config at
`num_visual_tokens=1`) reduces the frozen MobileNetV2 expert's 196 tokens (cached) to one token, and a linear colour
head reads it. The question enters as CoTR enters it in the model: the sum of the chat prompt's LLM token embeddings
(`prompt_text_sums`, template included). Data: distinct-layout object-named mosaics (three objects of distinct shapes
and colours, blanks elsewhere), "What colour is the <shape>?" only; a reducer that ignores the question scores about
1/3. Variants: `text` (the paper's scoring: query + self + cross + text terms) and `none` (`cotr_text_conditioning`
off: text-free queries), each read by the colour head; `text-llm`: the same `text` reducer read by LEO-MINI-Smol's
own projector (demo weights, trained along) and its frozen LLM and MMoE, trained on the model's own loss (the
answer's LM loss and its balance term; the model's `image_features` input takes the projected token; accuracy: the 8 colours' first answer tokens).

Probes on the test mosaics: colour accuracy; CoTR's attention share on the named object's cell; the share left on it,
and the share on the other object's cell, when the question names another shape of the same mosaic; accuracy with
the text sum zeroed; the tokens the attention effectively mixes. Every number with its standard error over the test
questions. The same head on fixed reductions (the mean of all tokens; the named cell's mean, an oracle) bounds it.

    python benchmarks/steering_screen.py [--steps 1200] [--variants text none] [--seed 0]
"""

import argparse
import copy
import math
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, ROOT, cell_share, prompt_text_sums, token_cells, write_results
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.demo import demo_checkpoint
from leo_mini_hf.easyvqa.dataset import COLOURS, SHAPES
from leo_mini_hf.easyvqa.object_named import DistinctObjectMosaicDataset
from leo_mini_hf.modeling.token_reduction import ConditionalTokenReduction

COLOUR_OF_SHAPE = "object colour of shape"
GRIDS = (2, 3)
VARIANTS = {"text": {"cotr_text_conditioning": True}, "none": {"cotr_text_conditioning": False},
            "text-llm": {"cotr_text_conditioning": True}}
LLM_READOUT = {"text-llm"}  # variants read by the frozen LLM instead of the colour head
LLM_BATCH = 32  # test questions per LLM forward


def colour_of_shape_samples(split: str, grid: int, count: int, seed: int) -> list[dict]:
    """`count` "What colour is the <shape>?" mosaics: image, question, colour index, named cell, and a counterfactual
    (another shape of the same mosaic, and its cell)."""
    dataset = DistinctObjectMosaicDataset(split, grid, size=count * len(DistinctObjectMosaicDataset.question_types),
                                          seed=seed)
    samples = []
    for index in range(len(dataset)):
        tiles, question, answer, question_type, named_cell = dataset.draw_with_named_cell(index)
        if question_type != COLOUR_OF_SHAPE:
            continue
        named_shape = tiles[named_cell].shape
        other_shape = next(shape for shape in SHAPES if shape != named_shape)
        other_cell = next(cell for cell, tile in enumerate(tiles) if tile.shape == other_shape)
        samples.append({"image": dataset[index]["messages"][0]["content"][0]["image"], "question": question,
                        "colour": COLOURS.index(answer), "cell": named_cell,
                        "other_question": question.replace(named_shape, other_shape), "other_cell": other_cell})
    return samples[:count]


@torch.no_grad()
def cached_features(model, processor, split: str, grid: int, count: int, seed: int, cache: Path) -> dict:
    """The expert's tokens (count, N, d) in float16, the prompt text sums (count, d) of the question and of the
    counterfactual question, colours, cells; computed once and kept in `cache` (our own file, weights_only load)."""
    path = cache / f"{split}-{grid}x{grid}-{count}-seed{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    samples = colour_of_shape_samples(split, grid, count, seed)
    features, text_sums, other_text_sums = [], [], []
    for start in range(0, len(samples), 16):
        batch = samples[start:start + 16]
        inputs, other_inputs = ([[{"role": "user", "content": [{"type": "image", "image": sample["image"]},
                                                                {"type": "text", "text": sample[key]}]}]
                                 for sample in batch] for key in ("question", "other_question"))
        inputs, other_inputs = (processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
            processor_kwargs={"padding": True}) for conversations in (inputs, other_inputs))
        features.append(model.vision_experts[0](inputs["pixel_values"]).half())
        text_sums.append(prompt_text_sums(model, inputs))
        other_text_sums.append(prompt_text_sums(model, other_inputs))
    data = {"features": torch.cat(features), "text_sum": torch.cat(text_sums),
            "other_text_sum": torch.cat(other_text_sums),
            "colour": torch.tensor([sample["colour"] for sample in samples]),
            "cell": torch.tensor([sample["cell"] for sample in samples]),
            "other_cell": torch.tensor([sample["other_cell"] for sample in samples])}
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


class ColourScreen(nn.Module):
    """One-query CoTR over one expert, then a linear colour head on the reduced token."""

    def __init__(self, config, hidden_size: int, num_tokens: int):
        super().__init__()
        self.reducer = ConditionalTokenReduction(config, [hidden_size], [num_tokens])
        self.head = nn.Linear(hidden_size, len(COLOURS))

    def forward(self, features: torch.Tensor, text_sum: torch.Tensor):
        """features (B, N, d), text_sum (B, d_text) → colour logits (B, colours), attention (B, N)."""
        tokens, weights = self.reducer([features.float()], text_sum, output_weights=True)
        return self.head(tokens[:, 0]), weights[0][:, 0]


@torch.no_grad()
def answer_prompts(processor, split: str, grid: int, count: int, seed: int, cache: Path) -> dict:
    """The chat prompt with one `<image>` token and the answer, per sample of `colour_of_shape_samples` (same order
    as `cached_features`): input_ids and labels (answer tokens only) right-padded (n, L), attention_mask, and the
    position whose logits predict the answer's first token."""
    path = cache / f"prompts-{split}-{grid}x{grid}-{count}-seed{seed}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    tokenizer = processor.tokenizer
    rows = []
    for sample in colour_of_shape_samples(split, grid, count, seed):
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        prompt = tokenizer(processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"]
        answer = tokenizer(COLOURS[sample["colour"]] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        rows.append((prompt, answer))
    length = max(len(prompt) + len(answer) for prompt, answer in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(rows):
        input_ids[row, :len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        labels[row, len(prompt):len(prompt) + len(answer)] = torch.tensor(answer)
        attention_mask[row, :len(prompt) + len(answer)] = 1
    data = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "answer_position": torch.tensor([len(prompt) - 1 for prompt, _ in rows])}
    torch.save(data, path)
    return data


class LLMScreen(nn.Module):
    """One-query CoTR over one expert, then LEO-MINI-Smol's projector (trained) and its frozen LLM with its MMoE
    adapters (the demo weights): the LLM reads the reduced token as the prompt's one image token."""

    def __init__(self, config, hidden_size: int, num_tokens: int, model, colour_token_ids: list[int]):
        super().__init__()
        self.reducer = ConditionalTokenReduction(config, [hidden_size], [num_tokens])
        self.projector = copy.deepcopy(model.multi_modal_projector).requires_grad_(True)
        self.__dict__["model"] = model  # frozen and not a submodule: the optimiser sees CoTR and the projector only
        self.colour_token_ids = colour_token_ids

    def forward(self, features: torch.Tensor, text_sum: torch.Tensor, prompts: dict):
        """features (B, N, d), text_sum (B, d_text), prompts: `answer_prompts` rows → (LM loss on the answers,
        logits of the 8 colours' first tokens (B, colours), attention (B, N))."""
        tokens, weights = self.reducer([features.float()], text_sum, output_weights=True)
        outputs = self.model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                             image_features=self.projector(tokens), labels=prompts["labels"])
        rows = torch.arange(len(tokens))
        colour_logits = outputs.logits[rows, prompts["answer_position"]][:, self.colour_token_ids]
        return outputs.loss, colour_logits, weights[0][:, 0]


def rows_of(data: dict, indices) -> dict:
    return {name: values[indices] for name, values in data.items()}


def readout(screen: nn.Module, data: dict, text_sum: torch.Tensor):
    """Colour logits (n, colours) and attention (n, N) for every row of `data` (LLM screens: in batches)."""
    if not isinstance(screen, LLMScreen):
        return screen(data["features"], text_sum)
    logits, weights = [], []
    for start in range(0, len(text_sum), LLM_BATCH):
        part = slice(start, start + LLM_BATCH)
        _, batch_logits, batch_weights = screen(data["features"][part], text_sum[part], rows_of(data["prompts"], part))
        logits.append(batch_logits)
        weights.append(batch_weights)
    return torch.cat(logits), torch.cat(weights)


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.float()
    return values.mean().item(), (values.std(unbiased=True) / math.sqrt(len(values))).item()


@torch.no_grad()
def probe(screen: nn.Module, data: dict, grid: int, cells: torch.Tensor) -> dict:
    """Accuracy, share on the named cell, the counterfactual question's shares, accuracy with the text zeroed, and
    how many tokens the attention effectively mixes (1 / Σ w²)."""
    screen.eval()
    logits, weights = readout(screen, data, data["text_sum"])
    shares = cell_share(weights[:, None], cells, grid)  # (n, cells)
    _, other_weights = screen.reducer([data["features"].float()], data["other_text_sum"], output_weights=True)
    other_shares = cell_share(other_weights[0][:, 0][:, None], cells, grid)
    zeroed_logits, _ = readout(screen, data, torch.zeros_like(data["text_sum"]))
    rows = torch.arange(len(shares))
    measured = {
        "accuracy": logits.argmax(-1) == data["colour"],
        "named_share": shares[rows, data["cell"]],
        "counterfactual_share_left": other_shares[rows, data["cell"]],
        "counterfactual_share_on_other": other_shares[rows, data["other_cell"]],
        "accuracy_text_zeroed": zeroed_logits.argmax(-1) == data["colour"],
        "effective_tokens": 1 / (weights**2).sum(-1),  # 196 for uniform weights, 1 for one token
    }
    screen.train()
    return {name: mean_and_error(values) for name, values in measured.items()}


def fit(module: nn.Module, loss_of, train: dict, args, before_step=None) -> None:
    """`args.steps` Adam steps, batches drawn from the grids in turn. loss_of(grid, batch indices) → the loss;
    before_step(step) runs before each step and after the last."""
    optimizer = torch.optim.Adam(module.parameters(), lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps + 1):
        if before_step is not None:
            before_step(step)
        if step == args.steps:
            break
        grid = GRIDS[step % len(GRIDS)]  # the grids alternate
        batch = torch.randint(len(train[grid]["colour"]), (args.batch_size,), generator=generator)
        loss = loss_of(grid, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def colour_loss(logits: torch.Tensor, colours: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, colours)


def train_variant(name: str, config, train: dict, test: dict, cells: dict, args, model=None,
                  colour_token_ids=None) -> dict:
    torch.manual_seed(args.seed)
    first = train[GRIDS[0]]["features"]
    if name in LLM_READOUT:
        screen = LLMScreen(config, first.shape[-1], first.shape[1], model, colour_token_ids)
    else:
        screen = ColourScreen(config, first.shape[-1], first.shape[1])
    curve, started = [], time.perf_counter()

    def probe_at(step):
        if step in args.probe_steps or step == args.steps:
            point = {"step": step, "samples": step * args.batch_size,
                     **{f"{grid}x{grid}": probe(screen, test[grid], grid, cells[grid]) for grid in GRIDS}}
            curve.append(point)
            print(f"{name} step {step}: " + "; ".join(
                f"{grid}x{grid} acc {point[f'{grid}x{grid}']['accuracy'][0]:.3f} share "
                f"{point[f'{grid}x{grid}']['named_share'][0]:.3f}" for grid in GRIDS), flush=True)

    def loss_of(grid, batch):
        data = train[grid]
        if name in LLM_READOUT:
            return screen(data["features"][batch], data["text_sum"][batch], rows_of(data["prompts"], batch))[0]
        return colour_loss(screen(data["features"][batch], data["text_sum"][batch])[0], data["colour"][batch])

    fit(screen, loss_of, train, args, before_step=probe_at)
    return {"variant": name, "config": VARIANTS[name], "curve": curve, "train_seconds": time.perf_counter() - started}


def readout_baselines(train: dict, test: dict, cells: dict, args) -> dict:
    """The same linear colour head, trained the same way, on fixed reductions instead of CoTR: the mean of all tokens
    (a reducer blind to the question) and the mean of the named cell's tokens (an oracle: what a perfect selection
    gives). Test accuracy per grid, ± standard error."""
    def mean_all(data, grid):
        return data["features"].float().mean(dim=1)

    def named_cell_mean(data, grid):
        in_cell = (cells[grid][None, :] == data["cell"][:, None]).float()  # (n, N)
        return (in_cell[..., None] * data["features"].float()).sum(1) / in_cell.sum(1, keepdim=True)

    results = {}
    for name, reduce in (("mean of all tokens", mean_all), ("named cell's tokens (oracle)", named_cell_mean)):
        torch.manual_seed(args.seed)
        head = nn.Linear(train[GRIDS[0]]["features"].shape[-1], len(COLOURS))
        reduced = {grid: reduce(train[grid], grid) for grid in GRIDS}
        fit(head, lambda grid, batch: colour_loss(head(reduced[grid][batch]), train[grid]["colour"][batch]), train,
            args)
        with torch.no_grad():
            results[name] = {f"{grid}x{grid}": mean_and_error(head(reduce(test[grid], grid)).argmax(-1)
                                                              == test[grid]["colour"]) for grid in GRIDS}
    return results


def cell_text(result: dict, key: str) -> str:
    mean, error = result[key]  # (mean, standard error)
    return f"{mean:.3f} ± {error:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--probe-steps", type=int, nargs="*", default=[0, 150, 300, 600, 900])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-mosaics", type=int, default=900, help="per grid")
    parser.add_argument("--test-mosaics", type=int, default=240, help="per grid")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".work" / "steering_screen")
    parser.add_argument("--out", type=Path, default=None, help="default: results/steering_screen/seed-<seed>/")
    args = parser.parse_args()
    out = args.out or RESULTS / "steering_screen" / f"seed-{args.seed}" / "steering_screen"
    torch.set_num_threads(args.threads)
    folder = demo_checkpoint()
    model = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    processor = LeoMiniProcessor.from_pretrained(folder)
    started = time.perf_counter()
    train = {grid: cached_features(model, processor, "train", grid, args.train_mosaics, 0, args.cache) for grid in GRIDS}
    test = {grid: cached_features(model, processor, "test", grid, args.test_mosaics, 0, args.cache) for grid in GRIDS}
    print(f"features and text sums: {time.perf_counter() - started:.0f} s", flush=True)
    expert = model.vision_experts[0]
    cells = {grid: token_cells(expert.num_tokens, grid) for grid in GRIDS}
    baselines = readout_baselines(train, test, cells, args)
    print(f"readout baselines: {baselines}", flush=True)
    colour_token_ids = None
    if LLM_READOUT & set(args.variants):  # the LLM reads one image token per prompt: the screen's one query
        model.config.num_visual_tokens = 1
        model.requires_grad_(False)
        for split, data in (("train", train), ("test", test)):
            count = args.train_mosaics if split == "train" else args.test_mosaics
            for grid in GRIDS:
                data[grid]["prompts"] = answer_prompts(processor, split, grid, count, 0, args.cache)
        colour_token_ids = [processor.tokenizer(colour, add_special_tokens=False)["input_ids"][0] for colour in COLOURS]
        assert len(set(colour_token_ids)) == len(COLOURS), "the colours' first tokens must differ"
    results = []
    for name in args.variants:
        config = copy.deepcopy(model.config)
        config.num_visual_tokens = 1
        for key, value in VARIANTS[name].items():
            setattr(config, key, value)
        results.append(train_variant(name, config, train, test, cells, args, model, colour_token_ids))
    command = shlex.join(["python", "benchmarks/steering_screen.py", *sys.argv[1:]])
    config = model.config
    lines = ["# Reducer-only screen: does CoTR's scoring select the object the question names?", "",
             f"Command: `{command}`  ",
             f"A fresh one-query CoTR (LEO-MINI-Smol's config: projection {config.cotr_projection_dim}, scaling "
             f"`{config.cotr_score_scaling}`) on the frozen MobileNetV2's {expert.num_tokens} tokens (448 px), a "
             f"linear colour head, no LLM; Adam lr {args.learning_rate}, batch {args.batch_size}, grids alternating; "
             f"{args.train_mosaics} train / {args.test_mosaics} test \"What colour is the <shape>?\" distinct-layout "
             "mosaics per grid (chance 0.125; a reducer blind to the question: about 0.33). Counterfactual: the same "
             "mosaic asked about another of its shapes. ± one standard error over the test questions.", "",
             "| variant | step | samples | grid | colour accuracy | share on the named cell | counterfactual: share "
             "left / share on the other object | accuracy, text zeroed | effective tokens |", "|---" * 9 + "|"]
    for row in results:
        for point in row["curve"]:
            for grid in GRIDS:
                result = point[f"{grid}x{grid}"]
                lines.append(f"| {row['variant']} | {point['step']} | {point['samples']} | {grid}×{grid} | "
                             f"{cell_text(result, 'accuracy')} | {cell_text(result, 'named_share')} | "
                             f"{cell_text(result, 'counterfactual_share_left')} / "
                             f"{cell_text(result, 'counterfactual_share_on_other')} | "
                             f"{cell_text(result, 'accuracy_text_zeroed')} | "
                             f"{result['effective_tokens'][0]:.1f} |")
    lines += ["", f"The same head on fixed reductions ({args.steps} steps, same optimiser): test colour accuracy.", "",
              "| reduction | 2×2 | 3×3 |", "|---|---|---|"]
    for name, result in baselines.items():
        lines.append(f"| {name} | " + " | ".join(cell_text(result, f"{grid}x{grid}") for grid in GRIDS) + " |")
    write_results(out, {"command": command, "results": results, "readout_baselines": baselines}, lines)


if __name__ == "__main__":
    main()
