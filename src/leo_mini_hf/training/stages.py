"""Training stages: which parts of LEO-MINI learn (the paper's stages 1–3)."""

from collections import defaultdict

from torch import nn

from ..modeling.modeling_leo_mini import PARAMETER_PARTS

STAGE_PARTS = {
    "pretrain": {"token_reducer", "projector"},
    # the paper's stage 3: the vision experts and the LLM (its own routers too, for a mixture-of-experts LLM) frozen
    "finetune": {"token_reducer", "projector", "mmoe_general_lora", "mmoe_routed_lora", "mmoe_routers"},
    "full": set(PARAMETER_PARTS),
}
STAGES = tuple(STAGE_PARTS)
TRAINED_PARTS = STAGE_PARTS["finetune"]  # what stage-3 training changes: CoTR, projector and MMoE, never the parts


def apply_training_stage(model, stage: str) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` exactly for `stage`; returns {part: (trainable, total)} parameter counts.

    Parts come from `model.parameter_parts()`, which sorts parameters by the class of the module holding them.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {STAGES}")
    parts = model.parameter_parts()
    quantized = [name for name, param in model.named_parameters()
                 if parts[name] in STAGE_PARTS[stage] and not param.is_floating_point()]
    if quantized:
        raise ValueError(f"stage {stage!r} would train quantized weights (e.g. {quantized[:2]}), which cannot learn; "
                         "on a quantized model train stage 'finetune' or 'pretrain' (LEO-MINI's own parts)")
    counts = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        part = parts[name]
        param.requires_grad = part in STAGE_PARTS[stage]
        counts[part][1] += param.numel()
        counts[part][0] += param.numel() if param.requires_grad else 0
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


def llm_linear_names(model) -> list[str]:
    """Full names of the LLM's own linears, the MMoE layers' base linears among them, not the LM head: PEFT's
    `target_modules` that adapts the LLM alone. (`"all-linear"` adapts every linear, as in transformers' VLMs: the
    vision experts, CoTR, the projector and the MMoE routers too.)

        get_peft_model(model, LoraConfig(target_modules=llm_linear_names(model)))
    """
    parts = model.parameter_parts()
    head = model.get_output_embeddings()
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head and parts.get(f"{name}.weight") == "llm"]


def format_parameter_table(counts: dict[str, tuple[int, int]]) -> str:
    rows = [f"{'part':<20} {'trainable':>14} {'total':>14}"]
    for part, (trainable, total) in sorted(counts.items()):
        rows.append(f"{part:<20} {trainable:>14,} {total:>14,}")
    trainable, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    rows.append(f"{'all':<20} {trainable:>14,} {total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(rows)
