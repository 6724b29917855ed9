"""`LeoMiniTrainer`: the HF Trainer, logging the MMoE balance loss on its own line, saving loadable checkpoints."""

import warnings

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..hub.checkpoint_folder import add_remote_code
from .elastic import BudgetSchedule, keep_visual_tokens


class SaveRemoteCodeCallback(TrainerCallback):
    """Every checkpoint also gets the remote-code files, so `from_pretrained` loads it without the package."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            add_remote_code(f"{args.output_dir}/checkpoint-{state.global_step}")
        return control


def logits_to_keep_for_labels(labels: torch.Tensor) -> int:
    """The fewest last positions whose logits cover every target in `labels` (B, T): position t predicts
    labels[:, t + 1]. 0 (all positions) when nothing is labelled."""
    predicting = (labels[:, 1:] != -100).any(dim=0).nonzero()
    return labels.shape[1] - int(predicting[0]) if len(predicting) else 0


class LeoMiniTrainer(Trainer):
    """Adds `aux_loss` (the unweighted MMoE load-balancing loss, mean since the last log) to the logs; training
    steps compute logits only from the first labelled position on (the loss is unchanged).

    An elastic model (`config.cotr_budgets`) trains each optimizer step at one budget drawn from its budgets, with
    probabilities ∝ `budget_weights` (uniform by default), seeded by `args.seed` and the step (`BudgetSchedule`); the
    batches come from the collator at the largest budget and keep the first k tokens of each image.
    """

    def __init__(self, *args, budget_weights: list[float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        self.budget_schedule = None
        if getattr(config, "cotr_budgets", None) is not None:
            self.budget_schedule = BudgetSchedule(config.cotr_budgets, budget_weights, seed=self.args.seed)
        elif budget_weights is not None:
            raise ValueError("budget_weights need an elastic model: its config has no cotr_budgets")
        if self.args.fsdp and not self.is_fsdp_enabled:
            warnings.warn(
                f"FSDP was requested but accelerate runs {self.accelerator.distributed_type.value} here (FSDP needs "
                "GPUs or other accelerators; on CPU it falls back to data parallelism), which replicates the model on "
                "every process instead of sharding it", UserWarning, stacklevel=2,
            )
        self.add_callback(SaveRemoteCodeCallback())
        self._aux_loss_sum, self._aux_loss_count = 0.0, 0

    def step_budget(self) -> int | None:
        """This optimizer step's visual-token budget (elastic models), else None."""
        return None if self.budget_schedule is None else self.budget_schedule.budget(self.state.global_step)

    def _pad_token_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.model.config.text_config.pad_token_id
        if pad_token_id is None:
            raise ValueError("Elastic training re-pads batches: pass processing_class= the processor (its tokenizer "
                             "needs a pad token) or set text_config.pad_token_id")
        return pad_token_id

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and self.budget_schedule is not None:
            config = self.model.config
            inputs = keep_visual_tokens(inputs, self.step_budget(), config.num_image_tokens, config.image_token_id,
                                        self._pad_token_id())
        if model.training and inputs.get("labels") is not None and "logits_to_keep" not in inputs:
            # the same loss, without the vocabulary projection of the prompt positions (~20% of a step's compute
            # with SmolLM2's 49k vocabulary); evaluation keeps every position's logits for metrics
            inputs = {**inputs, "logits_to_keep": logits_to_keep_for_labels(inputs["labels"])}
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        aux_loss = outputs.get("aux_loss") if isinstance(outputs, dict) else None
        if aux_loss is not None:
            self._aux_loss_sum += float(aux_loss.detach())
            self._aux_loss_count += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._aux_loss_count and "loss" in logs:
            logs["aux_loss"] = round(self._aux_loss_sum / self._aux_loss_count, 6)
            self._aux_loss_sum, self._aux_loss_count = 0.0, 0
        super().log(logs, start_time)


def default_training_arguments(**overrides) -> TrainingArguments:
    """TrainingArguments with what a multimodal collator needs (`remove_unused_columns=False`)."""
    defaults = {"remove_unused_columns": False, "report_to": "none"}
    defaults.update(overrides)
    defaults["remove_unused_columns"] = False
    return TrainingArguments(**defaults)
