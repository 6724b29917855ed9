"""The model card (README.md) of an exported checkpoint, from MODEL_CARD.md and the model's own numbers."""

import sysconfig
from collections import Counter
from pathlib import Path

CARD_TEMPLATE_NAME = "MODEL_CARD.md"


def card_template() -> str:
    """MODEL_CARD.md from the source checkout, or from where `pip install` put it."""
    candidates = [Path(__file__).resolve().parents[3] / CARD_TEMPLATE_NAME,
                  Path(sysconfig.get_paths()["data"]) / "share" / "leo-mini-hf" / CARD_TEMPLATE_NAME]
    for path in candidates:
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise FileNotFoundError(f"{CARD_TEMPLATE_NAME} not found in {[str(p) for p in candidates]}")


def render_model_card(model, repo_id: str, license_name: str, base_models: list[str]) -> str:
    config = model.config
    experts = model.vision_experts
    expert_rows = "\n".join(
        f"| {type(e.model).__name__} | {e.image_size} px | {e.num_tokens} x {e.hidden_size} |" for e in experts
    )
    part_of = model.parameter_parts()
    part_sizes = Counter()
    for name, param in model.named_parameters():  # each shared (tied) parameter once
        part_sizes[part_of[name]] += param.numel()
    parts = {
        "total": sum(part_sizes.values()),
        "LLM (incl. embeddings and LM head, without MMoE)": part_sizes["llm"],
        "vision experts": part_sizes["vision_experts"],
        "CoTR": part_sizes["token_reducer"],
        "projector": part_sizes["projector"],
        "MMoE (general + routed LoRA, routers)": sum(size for part, size in part_sizes.items()
                                                     if part.startswith("mmoe_")),
    }
    options = ["token_reduction", "num_visual_tokens", "cotr_projection_dim", "cotr_score_scaling", "cotr_shared_query",
               "mmoe_target_modules", "mmoe_num_experts", "mmoe_top_k", "mmoe_rank", "mmoe_alpha",
               "mmoe_router_uses_hidden_state", "mmoe_expert_weighting", "mmoe_balance_loss_coef", "image_size"]
    tokens_before = sum(e.num_tokens for e in experts)
    values = {
        "license": license_name,
        "base_model_block": "".join(["base_model:\n"] + [f"- {m}\n" for m in base_models]) if base_models else "",
        "model_name": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "expert_rows": expert_rows,
        "tokens_before": str(tokens_before),
        "tokens_after": str(config.num_image_tokens),
        "reduction": "CoTR" if config.token_reduction == "cotr" else "no reduction: full-token baseline",
        "parameter_rows": "\n".join(f"| {name} | {value:,} |" for name, value in parts.items()),
        "config_rows": "\n".join(f"- `{name}`: `{getattr(config, name)}`" for name in options),
    }
    card = card_template()
    for key, value in values.items():
        card = card.replace("{{" + key + "}}", value)
    return card
