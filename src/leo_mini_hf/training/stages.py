"""Training stages: which parameters learn (the paper's stages 1–3)."""

from collections import defaultdict

STAGES = ("pretrain", "finetune", "full")


def trainable_part(name: str) -> str:
    """The LEO-MINI part a parameter belongs to, from its name."""
    if "token_reducer" in name:
        return "cotr"
    if "multi_modal_projector" in name:
        return "projector"
    if "router" in name:
        return "mmoe_routers"
    if "experts_lora" in name:
        return "mmoe_routed_lora"
    if "general_lora" in name:
        return "mmoe_general_lora"
    if "vision_experts" in name:
        return "vision_experts"
    return "llm"


STAGE_PARTS = {
    "pretrain": {"cotr", "projector"},
    "finetune": {"cotr", "projector", "mmoe_routers", "mmoe_routed_lora", "mmoe_general_lora"},
    "full": {"cotr", "projector", "mmoe_routers", "mmoe_routed_lora", "mmoe_general_lora", "vision_experts", "llm"},
}


def apply_training_stage(model, stage: str) -> dict[str, tuple[int, int]]:
    """Set `requires_grad` exactly for `stage`; returns {part: (trainable, total)} parameter counts.

    `finetune` is the paper's stage 3: CoTR, projector, MMoE LoRA experts, routers and the general LoRA learn;
    the LLM and the vision experts stay frozen.
    """
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage!r}; choose one of {STAGES}")
    counts = defaultdict(lambda: [0, 0])
    for name, param in model.named_parameters():
        part = trainable_part(name)
        param.requires_grad = part in STAGE_PARTS[stage]
        counts[part][1] += param.numel()
        counts[part][0] += param.numel() if param.requires_grad else 0
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


def format_parameter_table(counts: dict[str, tuple[int, int]]) -> str:
    rows = [f"{'part':<20} {'trainable':>14} {'total':>14}"]
    for part, (trainable, total) in sorted(counts.items()):
        rows.append(f"{part:<20} {trainable:>14,} {total:>14,}")
    trainable, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    rows.append(f"{'all':<20} {trainable:>14,} {total:>14,}  ({100 * trainable / max(total, 1):.2f}% trainable)")
    return "\n".join(rows)
