"""`LeoMiniTrainer`: the HF Trainer, logging the MMoE balance loss on its own line, saving loadable checkpoints."""

import contextlib
import warnings
from collections import defaultdict

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..hub.checkpoint_folder import add_remote_code
from ..modeling.modeling_leo_mini import PARAMETER_PARTS
from .elastic import BUDGET_LOSSES, BudgetSchedule, keep_visual_tokens


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


def check_part_learning_rates(part_learning_rates: dict[str, float] | None) -> dict[str, float]:
    """{part: learning rate}, each part one of `PARAMETER_PARTS` and each rate a positive number; None → {}."""
    if part_learning_rates is None:
        return {}
    if not isinstance(part_learning_rates, dict):
        raise TypeError(f"part_learning_rates must be a dict {{part: learning rate}}, got {part_learning_rates!r}")
    for part, rate in part_learning_rates.items():
        if part not in PARAMETER_PARTS:
            raise ValueError(f"part_learning_rates names {part!r}, which is not a model part; parts: "
                             f"{', '.join(PARAMETER_PARTS)}")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise ValueError(f"part_learning_rates[{part!r}] must be a positive number, got {rate!r}")
    return {part: float(rate) for part, rate in part_learning_rates.items()}


def split_param_groups_by_part(optimizer: torch.optim.Optimizer, parameter_parts: dict[str, str],
                               named_parameters, part_learning_rates: dict[str, float]) -> None:
    """Give the parameters of each part in `part_learning_rates` their own learning rate: every param group is split
    into one group per rate, keeping its other settings (weight decay). Done before the first step (no state yet);
    the scheduler made afterwards scales each group from its own rate."""
    part_of = {id(param): parameter_parts[name] for name, param in named_parameters}
    trained_parts = {part_of[id(param)] for group in optimizer.param_groups for param in group["params"]}
    untrained = sorted(set(part_learning_rates) - trained_parts)
    if untrained:
        raise ValueError(f"part_learning_rates names {untrained}, which have no trained parameters in this model and "
                         f"stage (trained parts: {sorted(trained_parts)})")
    groups = []
    for group in optimizer.param_groups:
        params_by_rate = defaultdict(list)
        for param in group["params"]:
            params_by_rate[part_learning_rates.get(part_of[id(param)], group["lr"])].append(param)
        groups += [{**group, "params": params, "lr": rate} for rate, params in params_by_rate.items()]
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)


@contextlib.contextmanager
def quantized_base_with_own_adapters(model):
    """Let the Trainer take a quantized LEO-MINI that trains its own unquantized modules (QLoRA-style).

    transformers' Trainer refuses a quantized model without PEFT adapters ("purely quantized"). LEO-MINI carries its
    own: CoTR, the projector and the MMoE LoRA and routers stay unquantized in every quantized load. Inside this
    block a quantized LEO-MINI with trainable parameters passes that check (quantized weights cannot be trainable:
    `apply_training_stage` refuses a stage that would train them); one that trains nothing, or whose backend cannot
    train, is refused here with the reason.
    """
    if not getattr(model, "is_quantized", False) or getattr(model, "_hf_peft_config_loaded", False) or not hasattr(
            model, "parameter_parts"):
        yield
        return
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("This quantized LEO-MINI has no trainable parameters; train its own unquantized parts with "
                         "apply_training_stage(model, 'finetune')")
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not quantizer.is_trainable:
        method = quantizer.quantization_config.quant_method
        raise ValueError(f"transformers cannot train through a base quantized with {method}; quantize the base with "
                         "bitsandbytes (8-bit or 4-bit) to train LEO-MINI's own parts on it")
    model.is_quantized = False  # read by the Trainer's "purely quantized" check only
    try:
        yield
    finally:
        model.is_quantized = True


class LeoMiniTrainer(Trainer):
    """Adds `aux_loss` (the unweighted MMoE load-balancing loss, mean since the last log) to the logs; training
    steps compute logits only from the first labelled position on (the loss is unchanged).

    An elastic model (`config.cotr_budgets`) trains each optimizer step at one budget drawn from its budgets, with
    probabilities ∝ `budget_weights` (uniform by default), seeded by `args.seed` and the step (`BudgetSchedule`); the
    batches come from the collator at the largest budget and keep the first k tokens of each image. With
    `budget_loss="summed"` every step instead trains at every budget: the loss is Σ_k p_k · loss_k with the same
    probabilities p_k (so its scale is one budget's), at the cost of one forward and backward pass per budget.

    `part_learning_rates` ({part: rate}, parts as in `model.parameter_parts()`, e.g. {"token_reducer": 3e-3}) trains
    those parts at their own learning rate instead of `args.learning_rate`, on the same schedule.

    A quantized model (e.g. `BitsAndBytesConfig(load_in_4bit=True)`) trains its own unquantized parts on the frozen
    quantized base, as QLoRA does (`quantized_base_with_own_adapters`).
    """

    def __init__(self, *args, budget_weights: list[float] | None = None, budget_loss: str = "sampled",
                 part_learning_rates: dict[str, float] | None = None, **kwargs):
        if budget_loss not in BUDGET_LOSSES:
            raise ValueError(f"budget_loss must be one of {BUDGET_LOSSES}, got {budget_loss!r}")
        self.part_learning_rates = check_part_learning_rates(part_learning_rates)
        with quantized_base_with_own_adapters(kwargs.get("model", args[0] if args else None)):
            super().__init__(*args, **kwargs)
        config = self.model.config
        self.budget_schedule = None
        if getattr(config, "cotr_budgets", None) is not None:
            self.budget_schedule = BudgetSchedule(config.cotr_budgets, budget_weights, seed=self.args.seed)
        elif budget_weights is not None or budget_loss != "sampled":
            raise ValueError("budget_weights and budget_loss need an elastic model: its config has no cotr_budgets")
        self.budget_loss = budget_loss
        if self.args.fsdp and not self.is_fsdp_enabled:
            warnings.warn(
                f"FSDP was requested but accelerate runs {self.accelerator.distributed_type.value} here (FSDP needs "
                "GPUs or other accelerators; on CPU it falls back to data parallelism), which replicates the model on "
                "every process instead of sharding it", UserWarning, stacklevel=2,
            )
        self.add_callback(SaveRemoteCodeCallback())
        self._aux_loss_sum, self._aux_loss_count = 0.0, 0

    def step_budget(self, step: int | None = None) -> int | None:
        """The budget drawn for optimizer step `step` (default: this one) of an elastic model, else None."""
        if self.budget_schedule is None:
            return None
        return self.budget_schedule.budget(self.state.global_step if step is None else step)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None or not self.part_learning_rates:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        parts = opt_model.parameter_parts() if hasattr(opt_model, "parameter_parts") else {}
        named_parameters = dict(opt_model.named_parameters())
        if not set(named_parameters) <= set(parts):
            raise ValueError(f"part_learning_rates needs the LEO-MINI model itself, whose parameter names "
                             f"parameter_parts() knows; got a {type(opt_model).__name__} (e.g. a PEFT wrapper): give "
                             "its parts their rates with your own optimizer (Trainer(optimizers=...))")
        optimizer = super().create_optimizer(model)
        split_param_groups_by_part(optimizer, parts, named_parameters.items(), self.part_learning_rates)
        return optimizer

    def _pad_token_id(self) -> int:
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = self.model.config.text_config.pad_token_id
        if pad_token_id is None:
            raise ValueError("Elastic training re-pads batches: pass processing_class= the processor (its tokenizer "
                             "needs a pad token) or set text_config.pad_token_id")
        return pad_token_id

    def step_budgets(self, step: int | None = None) -> list[tuple[float, int]]:
        """An elastic model's (weight, budget) pairs the loss of optimizer step `step` (default: this one) sums over:
        the step's drawn budget, or every budget of non-zero weight with `budget_loss="summed"`."""
        if self.budget_loss == "summed":
            return [(float(probability), budget) for budget, probability
                    in zip(self.budget_schedule.budgets, self.budget_schedule.probabilities) if probability > 0]
        return [(1.0, self.step_budget(step))]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training or self.budget_schedule is None:
            return self._compute_loss_once(model, inputs, return_outputs, num_items_in_batch)
        config = self.model.config
        loss, outputs = 0.0, None
        for weight, budget in self.step_budgets():
            budget_inputs = keep_visual_tokens(inputs, budget, config.num_image_tokens, config.image_token_id,
                                               self._pad_token_id())
            budget_loss, outputs = self._compute_loss_once(model, budget_inputs, True, num_items_in_batch)
            loss = loss + weight * budget_loss
        return (loss, outputs) if return_outputs else loss

    def _compute_loss_once(self, model, inputs, return_outputs, num_items_in_batch):
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
