"""Elastic CoTR training: one visual-token budget per optimizer step, drawn from the model's `cotr_budgets`.

The collator builds every batch at the processor's default budget (the largest, N_V tokens per image). Each training
step, `LeoMiniTrainer` draws that step's budget k from `BudgetSchedule` and `keep_visual_tokens` keeps the first k
image tokens of every image: the same input_ids the processor makes with `num_visual_tokens=k` (image tokens are all
the same placeholder id). Drawing the budget in the trainer rather than in the collator ties it to the optimizer
step, so gradient accumulation, data-loader workers and a resumed run all see the same sequence
(`docs/design-choices.md`, "Elastic CoTR"). `budget_loss="summed"` trains every step at every budget instead.
"""

import numpy as np
import torch

from ..modeling.modeling_leo_mini import image_token_runs

# how an elastic model's training loss uses its budgets: one drawn per step, or all of them weighted
BUDGET_LOSSES = ("sampled", "summed")

# key → pad value (input_ids: the pad token)
PER_TOKEN_KEYS = {"input_ids": None, "attention_mask": 0, "labels": -100, "text_condition_mask": 0}


class BudgetSchedule:
    """The budget of optimizer step `step`: a draw from `budgets` with probabilities ∝ `weights` (uniform when None),
    a pure function of (seed, step), so a resumed run replays the same budgets."""

    def __init__(self, budgets: list[int], weights: list[float] | None = None, seed: int = 0):
        if not budgets:
            raise ValueError("BudgetSchedule needs at least one budget")
        weights = [1.0] * len(budgets) if weights is None else [float(w) for w in weights]
        if len(weights) != len(budgets):
            raise ValueError(f"Got {len(weights)} budget weights for the {len(budgets)} budgets {list(budgets)}")
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"Budget weights must be finite, non-negative and not all zero, got {weights}")
        self.budgets = list(budgets)
        self.probabilities = np.asarray(weights) / sum(weights)
        self.seed = seed

    def budget(self, step: int) -> int:
        rng = np.random.default_rng([self.seed, step])
        return int(self.budgets[rng.choice(len(self.budgets), p=self.probabilities)])


def keep_visual_tokens(batch: dict, budget: int, tokens_per_image: int, image_token_id: int,
                       pad_token_id: int) -> dict:
    """A collated batch with `tokens_per_image` image tokens per image → the same batch at `budget` tokens per image:
    the first `budget` tokens of every image's block are kept, the rest dropped, and the rows re-padded on the right.

    batch: input_ids (B, T), optional attention_mask and labels (B, T), and any non-token keys (pixel_values, ...),
    passed through. Returns input_ids / attention_mask / labels of shape (B, T') with T' ≤ T.
    """
    unknown = [key for key, value in batch.items() if key not in PER_TOKEN_KEYS and isinstance(value, torch.Tensor)
               and value.dim() == 2 and value.shape == batch["input_ids"].shape]
    if unknown:
        raise ValueError(f"keep_visual_tokens does not know how to shorten the per-token inputs {unknown}")
    if budget > tokens_per_image:
        raise ValueError(f"Cannot keep {budget} of {tokens_per_image} image tokens per image")
    if budget == tokens_per_image:
        return batch
    input_ids = batch["input_ids"]
    is_image = input_ids == image_token_id
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    runs = image_token_runs(input_ids, image_token_id)
    run_start = torch.zeros_like(input_ids).index_put((runs.rows, runs.starts), runs.starts)
    run_start = run_start.cummax(dim=1).values  # start of the run each image token is in
    keep = ~is_image | ((positions - run_start) % tokens_per_image < budget)
    if "attention_mask" in batch:
        keep = keep & batch["attention_mask"].bool()
    lengths = keep.sum(dim=1)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : int(lengths.max())]  # kept, in order
    is_padding = positions[:, : order.shape[1]] >= lengths.unsqueeze(1)
    shortened = dict(batch)
    for key, pad_value in PER_TOKEN_KEYS.items():
        if key in batch:
            value = pad_token_id if pad_value is None else pad_value
            shortened[key] = batch[key].gather(1, order).masked_fill(is_padding, value)
    return shortened
