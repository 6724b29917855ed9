"""The model card (README.md) of a checkpoint: huggingface_hub's `ModelCard` from MODEL_CARD.md (a Jinja template),
the model's own numbers, and what the builder knows (base models, training data, evaluation results)."""

import json
import re
import sysconfig
from collections import Counter
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

CARD_TEMPLATE_NAME = "MODEL_CARD.md"
EASY_VQA = "easy-vqa"  # the data the demo model is trained on (PyPI easy-vqa 1.0), as a card's `datasets` names it
CARD_OPTIONS = ("token_reduction", "num_visual_tokens", "cotr_projection_dim", "cotr_score_scaling",
                "cotr_shared_query", "mmoe_target_modules", "mmoe_num_experts", "mmoe_top_k", "mmoe_rank", "mmoe_alpha",
                "mmoe_router_uses_hidden_state", "mmoe_router_token_input", "mmoe_router_context",
                "mmoe_expert_weighting", "mmoe_balance_loss_coef", "image_size")


def card_template_path() -> Path:
    """MODEL_CARD.md from the source checkout, or from where `pip install` put it."""
    candidates = [Path(__file__).resolve().parents[3] / CARD_TEMPLATE_NAME,
                  Path(sysconfig.get_paths()["data"]) / "share" / "leo-mini-hf" / CARD_TEMPLATE_NAME]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{CARD_TEMPLATE_NAME} not found in {[str(p) for p in candidates]}")


def hub_model_id(folder) -> str | None:
    """The Hub id of a model folder inside the Hugging Face cache (`.../models--org--name/snapshots/<rev>`), else None:
    what a builder knows of where a local part came from."""
    for part in Path(folder).resolve().parts:
        match = re.fullmatch(r"models--([^/]+?)--(.+)", part)
        if match:
            return f"{match.group(1)}/{match.group(2)}"
    return None


def card_facts(folder) -> dict:
    """{"base_models", "datasets"} from the card of a checkpoint folder this package wrote ({} lists without one), so
    an export keeps what its builder knew."""
    path = Path(folder) / "README.md"
    data = ModelCard.load(path).data if path.is_file() else ModelCardData()

    def as_list(value):
        return [value] if isinstance(value, str) else list(value or [])

    return {"base_models": as_list(data.base_model), "datasets": as_list(data.datasets)}


def eval_results_from(paths) -> list[dict]:
    """The results `leo-mini eval --output FILE` wrote, checked: [{"dataset", "split", "accuracy", "count"}]."""
    results = []
    for path in paths:
        try:
            result = json.loads(Path(path).read_text())
            row = {key: result[key] for key in ("dataset", "split", "accuracy", "count")}
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a result file written by `leo-mini eval --output` ({error!r})") from None
        if result.get("swap_images"):
            raise ValueError(f"{path} is a --swap-images control (each question shown another image), not the "
                             "model's accuracy; evaluate without --swap-images for the model card")
        results.append(row)
    return results


def parameter_counts(model) -> dict[str, int]:
    """Parameters per part, each shared (tied) parameter once."""
    part_of = model.parameter_parts()
    sizes = Counter()
    for name, param in model.named_parameters():
        sizes[part_of[name]] += param.numel()
    return {
        "total": sum(sizes.values()),
        "LLM (incl. embeddings and LM head, without MMoE)": sizes["llm"],
        "vision experts": sizes["vision_experts"],
        "CoTR": sizes["token_reducer"],
        "projector": sizes["projector"],
        "MMoE (general + routed LoRA, routers)": sum(size for part, size in sizes.items() if part.startswith("mmoe_")),
    }


def model_card(model, repo_id: str, license_name: str = "apache-2.0", base_models=(), datasets=(),
               eval_results=()) -> ModelCard:
    """The card of `model` as it will be published under `repo_id`. `base_models` and `datasets`: Hub ids (the
    demo's training data is `EASY_VQA`); `eval_results`: rows of `eval_results_from`, written as `model-index`."""
    config = model.config
    experts = [{"name": type(e.model).__name__, "image_size": e.image_size, "num_tokens": e.num_tokens,
                "hidden_size": e.hidden_size} for e in model.vision_experts]
    model_name = repo_id.split("/")[-1]
    base_models, datasets = list(dict.fromkeys(base_models)), list(dict.fromkeys(datasets))
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="image-text-to-text", license=license_name,
        tags=["custom_code", "leo-mini", "multimodal", "image-text-to-text"], base_model=base_models or None,
        datasets=datasets or None, model_name=model_name,
        eval_results=[EvalResult(task_type="visual-question-answering", dataset_type=row["dataset"],
                                 dataset_name=row["dataset"], dataset_split=row["split"], metric_type="accuracy",
                                 metric_name="exact-match accuracy", metric_value=row["accuracy"])
                      for row in eval_results] or None,
    )
    return ModelCard.from_template(
        card_data, template_path=str(card_template_path()), model_name=model_name, repo_id=repo_id, experts=experts,
        tokens_before=sum(e["num_tokens"] for e in experts), tokens_after=config.num_image_tokens,
        reduction="CoTR" if config.token_reduction == "cotr" else (
            "no reduction: full-token baseline" if config.token_reduction == "none" else config.token_reduction),
        token_reduction=config.token_reduction, parameters=parameter_counts(model),
        options={name: getattr(config, name) for name in CARD_OPTIONS}, eval_rows=list(eval_results),
        base_models=base_models, trained_on_easy_vqa_only=datasets == [EASY_VQA],
    )


def write_model_card(model, folder, **facts) -> Path:
    """`model_card(model, repo_id=f"your-org/{folder name}", **facts)` saved as `folder`/README.md."""
    folder = Path(folder)
    facts.setdefault("repo_id", f"your-org/{folder.name}")
    model_card(model, **facts).save(folder / "README.md")
    return folder / "README.md"
