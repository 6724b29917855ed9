"""What the benchmark scripts share: the configurations they train and read, resumable-run bookkeeping, trained
weights on disk, and the mosaic cell measurements. Each script imports from here (never from another script)."""

import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import TrainerCallback

from leo_mini_hf.demo import DEMO_WEIGHTS
from leo_mini_hf.easyvqa.evaluation import prompt_inputs
from leo_mini_hf.easyvqa.mosaic import CELL_NAMES
from leo_mini_hf.easyvqa.object_named import object_named_dataset
from leo_mini_hf.modeling.token_reduction import prompt_text_mask, prompt_text_sum
from leo_mini_hf.training.adapter_weights import load_adapter_weights, sha256_of, trained_parameter_names

ROOT = Path(__file__).resolve().parents[1]
# results/<study>/<variant>/seed-<n>/: each study's variants, their rows per seed beside the tables built from them
RESULTS = ROOT / "benchmarks" / "results"


def git_commit() -> str | None:
    """The commit the results were produced at (a `+` marks uncommitted changes), or None outside a checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+" if dirty else "")


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (VmHWM). Not `getrusage`'s ru_maxrss: on Linux a child process starts with its
    parent's RSS at the fork as its peak (the pre-exec peak is kept), so a worker would report its launcher's."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def write_results(out: Path, data: dict, lines: list[str]) -> None:
    """OUT.json (the data, with the commit it was produced at) and OUT.md (the table `lines`), then the table on
    stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"commit": git_commit(), **data}, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

# The rows of accuracy_at_budget.py: LEO-MINI-Smol config overrides, by name (cotr_cell_attention.py and
# cotr_steering_probe.py read the same rows).
CONFIGS = {
    "cotr-16": {"num_visual_tokens": 16},
    "cotr-64": {"num_visual_tokens": 64},
    "cotr-4": {"num_visual_tokens": 4},
    "avgpool-16": {"token_reduction": "avg_pool", "num_visual_tokens": 16},
    "queries-16": {"num_visual_tokens": 16, "cotr_text_conditioning": False},
    "cotr-16-no-mmoe": {"num_visual_tokens": 16, "mmoe_num_experts": 0},
    "cotr-16-sum": {"num_visual_tokens": 16, "cotr_pooling": "sum"},
    "cotr-16-pos": {"num_visual_tokens": 16, "cotr_position_embedding": True},
    "cotr-16-pos-cos": {"num_visual_tokens": 16, "cotr_position_embedding": True, "cotr_score_scaling": "cosine"},
    "avgpool-64": {"token_reduction": "avg_pool", "num_visual_tokens": 64},
    "avgpool-4": {"token_reduction": "avg_pool", "num_visual_tokens": 4},
    "queries-64": {"num_visual_tokens": 64, "cotr_text_conditioning": False},
    "queries-4": {"num_visual_tokens": 4, "cotr_text_conditioning": False},
    "full-196": {"token_reduction": "none"},
}


def display_path(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class TrainingTimer(TrainerCallback):
    """Training wall time summed over resumed runs: each checkpoint records the seconds spent up to it, last, so a
    checkpoint with that record is complete (one interrupted while being written has none)."""

    FILE = "train_seconds.json"

    @classmethod
    def last_complete_checkpoint(cls, run_dir: Path) -> Path | None:
        complete = [path for path in run_dir.glob("checkpoint-*") if (path / cls.FILE).exists()]
        return max(complete, key=lambda path: int(path.name.rpartition("-")[2]), default=None)

    def __init__(self):
        self.previous_seconds, self.started = 0.0, None

    def resume_from(self, checkpoint: Path) -> None:
        self.previous_seconds = json.loads((checkpoint / self.FILE).read_text())["seconds"]

    def total_seconds(self) -> float:
        return self.previous_seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            (checkpoint / self.FILE).write_text(json.dumps({"step": state.global_step,
                                                            "seconds": self.total_seconds()}))


def train_resumably(model, processor, train_set, run_dir: Path, args, label: str, callbacks=(),
                    budget_weights=None, budget_loss="sampled", part_learning_rates=None) -> tuple:
    """Stage-3 training of one row (`args`: steps, batch_size, learning_rate, seed, checkpoint_steps): cosine
    schedule, 10% warm-up, a resumable checkpoint every `checkpoint_steps` (resumed from the last complete one), and
    the checkpoints removed once done; an elastic model draws a budget per step (`budget_weights`, default uniform)
    or, with `budget_loss="summed"`, trains at every budget each step; `part_learning_rates` ({part: rate}) gives
    parts their own learning rate.
    Returns (trainer, training seconds summed over resumed runs)."""
    from leo_mini_hf.training.collator import LeoMiniDataCollator
    from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments

    checkpointing = ({"save_strategy": "steps", "save_steps": args.checkpoint_steps, "save_total_limit": 1}
                     if args.checkpoint_steps else {"save_strategy": "no"})
    training = default_training_arguments(
        output_dir=str(run_dir), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=args.learning_rate, warmup_steps=max(1, args.steps // 10),
        lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 20), seed=args.seed, data_seed=args.seed,
        use_cpu=True, disable_tqdm=True, **checkpointing,
    )
    timer = TrainingTimer()
    trainer = LeoMiniTrainer(model=model, args=training, train_dataset=train_set, callbacks=[timer, *callbacks],
                             data_collator=LeoMiniDataCollator(processor), processing_class=processor,
                             budget_weights=budget_weights, budget_loss=budget_loss,
                             part_learning_rates=part_learning_rates)
    checkpoint = TrainingTimer.last_complete_checkpoint(run_dir)
    if checkpoint is not None:
        timer.resume_from(checkpoint)
        print(f"{label}: resuming from {checkpoint} ({timer.previous_seconds:.0f} s of training so far)", flush=True)
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = timer.total_seconds()
    for finished in run_dir.glob("checkpoint-*"):  # the row is resumable from its result JSON from here on
        shutil.rmtree(finished)
    return trainer, train_seconds


def load_trained_weights(model, run_dir: Path) -> Path | None:
    """A finished row's trained.safetensors, else the trained parts of its last complete Trainer checkpoint (a row
    still training); returns the file loaded, or None when there is neither."""
    if (run_dir / "trained.safetensors").exists():
        load_adapter_weights(model, run_dir / "trained.safetensors")
        return run_dir / "trained.safetensors"
    checkpoint = TrainingTimer.last_complete_checkpoint(run_dir) if run_dir.is_dir() else None
    if checkpoint is None:
        return None
    path = checkpoint / "model.safetensors"
    trained = trained_parameter_names(model)
    with safe_open(str(path), framework="pt") as handle:
        missing = sorted(trained - set(handle.keys()))
        if missing:
            raise ValueError(f"{path} does not hold every trained part of the model, e.g. {missing[:3]}")
        model.load_state_dict({name: handle.get_tensor(name) for name in trained}, strict=False)
    return path


# ---- mosaic cells: where CoTR looks --------------------------------------------------------------------------

def token_cells(num_tokens: int, mosaic_grid: int) -> torch.Tensor:
    """(num_tokens,) the mosaic cell (row-major) holding each expert token's centre; the expert's tokens form a square,
    row-major grid."""
    grid_side = math.isqrt(num_tokens)
    centres = ((torch.arange(grid_side) + 0.5) * mosaic_grid / grid_side).floor().long()
    return (centres[:, None] * mosaic_grid + centres[None, :]).flatten()


def cell_share(weights: torch.Tensor, cells: torch.Tensor, mosaic_grid: int, per_query: bool = False) -> torch.Tensor:
    """CoTR weights (n, N_V, N) → attention share of each mosaic cell (n, cells): mean over the queries, summed over
    the tokens of the cell (`cells`: token_cells). per_query: each query's own share instead, (n, N_V, cells)."""
    per_token = weights if per_query else weights.mean(dim=1)
    return torch.zeros(*per_token.shape[:-1], mosaic_grid**2, dtype=per_token.dtype).index_add(-1, cells, per_token)


@torch.no_grad()
def cell_questions(model, processor, image, mosaic_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """"What colour is the shape in the <cell>?" for every cell of one mosaic: its pixel_values (1, 3, S, S) and
    the prompt text sums CoTR is conditioned on, (cells, d) in CELL_NAMES order."""
    conversations = [[{"role": "user", "content": [
        {"type": "image", "image": image}, {"type": "text", "text": f"What colour is the shape in the {cell}?"}]}]
        for cell in CELL_NAMES[mosaic_grid]]
    inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    return inputs["pixel_values"][:1], prompt_text_sums(model, inputs)  # the same mosaic in every prompt: one picture


def prompt_text_sums(model, inputs) -> torch.Tensor:
    """(B, d): the sum of each prompt's text-token embeddings, which CoTR is conditioned on, as the model's forward
    computes it (prompts only, no labels; only the user's words for a `cotr_text_source="user"` model)."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    text_mask = prompt_text_mask(inputs["input_ids"], embeds, inputs["attention_mask"], None,
                                 model.config.image_token_id)
    if "text_condition_mask" in inputs:
        text_mask = text_mask & inputs["text_condition_mask"].bool()
    return prompt_text_sum(embeds, text_mask)


def steering_of(shares: torch.Tensor) -> dict:
    """shares (mosaics, cells asked, cells measured) → named-cell share, other-question share, steering, and the
    share of the most-attended cell (how concentrated the reduction is at all)."""
    cells = shares.shape[-1]
    named = torch.diagonal(shares, dim1=1, dim2=2)  # (mosaics, cells)
    others = (shares.sum(dim=1) - named) / (cells - 1)  # share on c when another cell is asked
    steering_per_mosaic = (named - others).mean(dim=1)
    return {"named_cell_share": named.mean().item(), "share_when_other_cell_asked": others.mean().item(),
            "largest_cell_share": shares.amax(dim=-1).mean().item(), "steering": steering_per_mosaic.mean().item(),
            "steering_std_error": (steering_per_mosaic.std() / len(shares) ** 0.5).item()}


# ---- object-named mosaics (object_named.py, elastic.py): warm start, the named-cell share, standard errors ------

WARM_PARTS = {"projector+mmoe": {"projector", "mmoe_general_lora", "mmoe_routed_lora", "mmoe_routers"}}
WARM_PARTS["reducer"] = WARM_PARTS["projector+mmoe"] | {"token_reducer"}
GRIDS = (2, 3)
# object-named layout → the folder its rows' runs (.work/runs/) and results (results/) go in
OBJECT_NAMED_FOLDERS = {"unique": "object-named", "distinct": "object-distinct"}  # under .work/runs/
OBJECT_NAMED_RESULTS = {layout: RESULTS / "object-named" / layout for layout in OBJECT_NAMED_FOLDERS}
ELASTIC_BUDGETS = [1, 4, 16]  # elastic.py's model: cotr_budgets, the largest is num_visual_tokens


def warm_start(model, parts: set[str]) -> dict:
    """Copy the demo weights of `parts` into the model (CoTR queries: the first k of the demo's 16). Returns which
    trained parameters started warm and which fresh."""
    expected = DEMO_WEIGHTS.with_suffix(".sha256").read_text().split()[0]
    if sha256_of(DEMO_WEIGHTS) != expected:
        raise ValueError(f"{DEMO_WEIGHTS} does not match its checksum")
    demo = load_file(str(DEMO_WEIGHTS))
    model_parts, model_state = model.parameter_parts(), model.state_dict()
    warm = {}
    for name, part in model_parts.items():
        if part not in parts or name not in demo:
            continue
        tensor = demo[name]
        if name.endswith("token_reducer.queries"):
            tensor = tensor[:, : model_state[name].shape[1]]  # nested: the first k queries
        if tensor.shape != model_state[name].shape:
            raise ValueError(f"demo weight {name} {tuple(tensor.shape)} does not fit {tuple(model_state[name].shape)}")
        warm[name] = tensor.to(model_state[name].dtype)
    model.load_state_dict(warm, strict=False)
    trained = {name for name, part in model_parts.items() if part in WARM_PARTS["reducer"]}
    fresh = sorted(trained - set(warm))
    return {"warm_parts": sorted(parts), "warm_parameters": len(warm), "fresh_parameters": fresh}


@torch.no_grad()
def named_cell_shares(model, samples: list[dict], processor, grid: int, num_visual_tokens: int | None = None) -> dict:
    """CoTR's attention share (first expert, mean over the queries) on the named tile's cell, per question type,
    for samples that name a tile; with the cell's share of the expert's tokens (what uniform attention gives it).
    num_visual_tokens: an elastic model's budget (its first k queries)."""
    samples = [sample for sample in samples if sample["named_cell"] is not None]
    cells = token_cells(model.vision_experts[0].num_tokens, grid)
    token_share = torch.bincount(cells, minlength=grid**2).float() / len(cells)
    by_type: dict[str, list[tuple[float, float]]] = {}
    for sample, share in zip(samples, named_tile_shares(model, processor, samples, grid, num_visual_tokens)):
        cell = sample["named_cell"]
        by_type.setdefault(sample["question_type"], []).append((share, token_share[cell].item()))
    result = {}
    for kind, pairs in sorted(by_type.items()):
        named = torch.tensor([named for named, _ in pairs])
        result[kind] = {"named_cell_share": named.mean().item(),
                        "named_cell_share_std_error": (named.std() / len(named) ** 0.5).item(),
                        "uniform_share": sum(uniform for _, uniform in pairs) / len(pairs), "count": len(pairs)}
    return result


@torch.no_grad()
def named_tile_shares(model, processor, samples: list[dict], grid: int, num_visual_tokens: int | None = None,
                      zero_text: bool = False, per_query: bool = False) -> list:
    """Per sample (each naming a tile: its `named_cell`), CoTR's attention share (first expert, mean over the
    queries) on that tile's cell. num_visual_tokens: an elastic model's budget; zero_text: CoTR conditioned on a zero
    prompt-text sum instead of the prompt's; per_query: a list of each query's share per sample instead."""
    cells = token_cells(model.vision_experts[0].num_tokens, grid)
    shares = []
    for start in range(0, len(samples), 16):
        batch = samples[start:start + 16]
        inputs = prompt_inputs(processor, batch, num_visual_tokens)
        text_sums = prompt_text_sums(model, inputs)
        if zero_text:
            text_sums = torch.zeros_like(text_sums)
        budgets = None if num_visual_tokens is None else torch.full((len(batch),), num_visual_tokens)
        _, weights = model.get_image_features(inputs["pixel_values"], text_sums, budgets,
                                              output_reduction_weights=True)
        weights = weights[0]  # the first expert's
        per_cell = cell_share(weights, cells, grid, per_query)
        shares += [per_cell[row, ..., sample["named_cell"]].tolist() for row, sample in enumerate(batch)]
    return shares


@torch.no_grad()
def score_term_spreads(model, processor, samples: list[dict]) -> dict:
    """CoTR's four score terms (first expert, each times its scale: `score_terms`) and how far each spreads over the
    expert's tokens (standard deviation over tokens, mean over samples and queries): how much each can move the
    softmax; the query term's also per query ("query_per_query").
    Also the part of the text term that differs between questions: the text term minus the text term of the batch's
    mean prompt-text sum (batches of 16; with cosine scores, the mean sum's direction).
    A text-free reducer (`cotr_text_conditioning=False`) has no text terms: their keys are absent."""
    reducer = model.token_reducer
    if reducer.position_embeddings is not None or len(model.vision_experts) != 1:
        raise ValueError("the term split here covers one expert and no position embedding")
    has_text = reducer.text_projections is not None
    spreads = {term: [] for term in ("query", "self", "cross", "text", "text_question_part", "total")
               if has_text or not term.startswith("text")}
    query_spread_per_query = []  # (n, N_V) per batch
    for start in range(0, len(samples), 16):
        inputs = prompt_inputs(processor, samples[start:start + 16])
        features = [expert(inputs["pixel_values"]) for expert in model.vision_experts]
        text_sum = prompt_text_sums(model, inputs)
        terms = reducer.score_terms(features, text_sum)[0]
        terms["total"] = sum(terms.values())
        if has_text:
            mean_text = text_sum.mean(dim=0, keepdim=True).expand_as(text_sum)
            terms["text_question_part"] = terms["text"] - reducer.score_terms(features, mean_text)[0]["text"]
        for term, scores in terms.items():
            spreads[term].append(scores.std(dim=-1).mean(dim=1))  # (n,)
        query_spread_per_query.append(terms["query"].std(dim=-1))
    return {**{term: torch.cat(values).mean().item() for term, values in spreads.items()},
            "query_per_query": torch.cat(query_spread_per_query).mean(dim=0).tolist()}


def assemble_elastic_model(work_dir: Path):
    """(model, processor) of LEO-MINI-Smol with `cotr_budgets=ELASTIC_BUDGETS`, fresh trainable parts."""
    from leo_mini_hf.conversion.smol import assemble_leo_mini_smol

    return assemble_leo_mini_smol(work_dir / "parts", num_visual_tokens=ELASTIC_BUDGETS[-1],
                                  cotr_budgets=ELASTIC_BUDGETS)


def load_object_named_row(name: str, seed: int, work_dir: Path, results_dir: Path):
    """(model, processor) of a finished object_named.py row, in eval mode: its configuration from its result JSON,
    its trained weights from its run folder (that of the row's layout)."""
    from leo_mini_hf.conversion.smol import assemble_leo_mini_smol

    row = json.loads((results_dir / f"seed-{seed}" / f"{name}.json").read_text())
    model, processor = assemble_leo_mini_smol(work_dir / "parts", **row["overrides"])
    run_dir = work_dir / "runs" / OBJECT_NAMED_FOLDERS[row.get("layout", "unique")] / f"seed-{seed}" / name
    load_adapter_weights(model, run_dir / "trained.safetensors")
    return model.eval(), processor


class AttentionShareProbe(TrainerCallback):
    """At every checkpoint, the named-cell share on a few test mosaics per grid, appended to `log_path` (JSON lines;
    a resumed row keeps the earlier lines); num_visual_tokens: an elastic model's budget to measure at; layout: the
    object-named mosaics' layout ("unique" or "distinct")."""

    def __init__(self, model, processor, log_path: Path, mosaics: int, num_visual_tokens: int | None = None,
                 layout: str = "unique"):
        self.model, self.processor, self.log_path = model, processor, log_path
        self.num_visual_tokens = num_visual_tokens
        self.samples = {grid: [object_named_dataset("test", grid, mosaics, 0, layout)[i] for i in range(mosaics)]
                        for grid in GRIDS}

    def on_save(self, args, state, control, **kwargs):
        was_training = self.model.training
        self.model.eval()
        entry = {"step": state.global_step,
                 **{f"{grid}x{grid}": named_cell_shares(self.model, samples, self.processor, grid,
                                                        self.num_visual_tokens)
                    for grid, samples in self.samples.items()}}
        self.model.train(was_training)
        with self.log_path.open("a") as log:
            log.write(json.dumps(entry) + "\n")


def with_std_errors(evaluation: dict) -> dict:
    """Binomial standard error of each accuracy: sqrt(p (1 − p) / n)."""
    errors = {kind: math.sqrt(p * (1 - p) / evaluation["count_per_type"][kind])
              for kind, p in evaluation["per_type"].items()}
    overall = evaluation["accuracy"]
    return {**evaluation, "std_error": math.sqrt(overall * (1 - overall) / evaluation["count"]),
            "per_type_std_error": errors}


def share_cell(result: dict, set_name: str) -> str:
    """Named-cell share over every question that names a tile, against uniform attention's share."""
    shares = result["named_cell_share"].get(set_name)
    if not shares:
        return "–"
    count = sum(s["count"] for s in shares.values())
    named = sum(s["named_cell_share"] * s["count"] for s in shares.values()) / count
    uniform = sum(s["uniform_share"] * s["count"] for s in shares.values()) / count
    return f"{named:.3f} (uniform {uniform:.3f})"


SHORT_TYPE_NAMES = {"object colour of shape": "colour", "object shape of colour": "shape",
                    "object colour and shape": "binding"}


def accuracy_by_tokens_figure(path: Path, draw, legend_columns: int, title: str = "object-named mosaics") -> None:
    """One panel per mosaic grid ("<title> 2×2", ...) of test accuracy against visual tokens (log 2 axis, a factor 2 of
    room either side of the points, so one budget alone stays readable); `draw(axis, grid)` plots the points of that
    grid with labels. Saved to `path` (nothing without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    figure, axes = plt.subplots(1, len(GRIDS), figsize=(6.5 * len(GRIDS), 4.2), squeeze=False)
    for axis, grid in zip(axes[0], GRIDS):
        axis.set_xscale("log", base=2)
        draw(axis, grid)
        axis.set_xlim(axis.dataLim.x0 / 2, axis.dataLim.x1 * 2)
        axis.set_xlabel("visual tokens per image in the LLM")
        axis.set_ylabel("test accuracy, all three question types")
        axis.set_title(f"{title} {grid}×{grid}", fontsize=10)
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=legend_columns, fontsize=8,
                  frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")


def add_object_named_arguments(parser) -> None:
    """The options of an object-named training row (object_named.py, elastic.py): recipe, test sizes, folders."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-size", type=int, default=4000,
                        help="easy-vqa train questions, and as many 2×2 and as many 3×3 train mosaics")
    parser.add_argument("--eval-size", type=int, default=600, help="test mosaics per grid")
    parser.add_argument("--easy-vqa-limit", type=int, default=400)
    parser.add_argument("--share-mosaics", type=int, default=300, help="test mosaics per grid for the named-cell share")
    parser.add_argument("--probe-mosaics", type=int, default=40, help="the same, at each checkpoint during training")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / ".work")
    parser.add_argument("--feature-cache", type=Path, default=ROOT / "benchmarks" / ".work" / "feature-cache")
    parser.add_argument("--no-feature-cache", dest="feature_cache", action="store_const", const=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpoint-steps", type=int, default=250)
    parser.add_argument("--report-only", action="store_true")
