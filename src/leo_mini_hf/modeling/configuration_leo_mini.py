"""LEO-MINI configuration."""

import copy
import dataclasses
import math
import numbers
import types
from typing import Literal, get_args

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD

VISION_EXPERT_KEYS = {"config", "image_size", "feature_layer", "num_prefix_tokens", "image_mean", "image_std"}
POSITIVE_OPTIONS = ("image_size", "num_visual_tokens", "cotr_projection_dim", "full_token_grid", "mmoe_rank",
                    "mmoe_alpha", "mmoe_router_hidden_size")
NON_NEGATIVE_OPTIONS = ("image_token_id", "mmoe_num_experts", "mmoe_top_k", "mmoe_balance_loss_coef")
# Options added after checkpoints were saved without them → the value those checkpoints were trained with (a saved
# config.json that lacks the option loads with it; a config built in code takes the declared default).
SAVED_BEFORE_OPTION = {"mmoe_router_token_input": "hidden_state", "mmoe_router_context": "per_layer"}


def _type_error(name: str, value, annotation) -> str | None:
    """Why `value` does not fit `annotation` (int, float, bool, str, list, Literal, `X | None`), or None if it fits."""
    allowed = get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if getattr(kind, "__origin__", None) is Literal:
            if value in get_args(kind):
                return None
            return f"must be one of {get_args(kind)}, got {value!r}"
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return None
        if kind in (bool, str, list) and isinstance(value, kind):
            return None
    return f"must be of type {getattr(annotation, '__name__', annotation)}, got {type(value).__name__} {value!r}"


def _expert_token_grid(expert: dict) -> int:
    """Side of an expert's output grid, from its config alone (patch models: size / patch; CNNs: size / 32)."""
    patch_size = expert["config"].get("patch_size")
    stride = patch_size if patch_size else 32
    return max(1, expert["image_size"] // stride)


class LeoMiniConfig(PreTrainedConfig):
    r"""
    Configuration of a LEO-MINI model: vision experts → token reduction (CoTR) → MLP projector → LLM with MMoE LoRA
    experts. Where the paper is ambiguous the choice is an option; `docs/design-choices.md` gives the reasons for
    each default.

    Args:
        text_config (`dict` or `PreTrainedConfig`): complete config of any causal LM (`AutoModel.from_config` builds
            it). Required.
        vision_experts (`list[dict]`): one dict per expert: `config` (complete transformers config dict with its
            `model_type`), `image_size` (its input side), `feature_layer` (None: last hidden state; int: index into
            `hidden_states`), `num_prefix_tokens` (CLS / register tokens dropped), `image_mean`, `image_std`.
        image_size, image_mean, image_std: the canonical `pixel_values` every expert resizes and re-normalises from.
        image_token_id (`int`): the image placeholder token; inside the LLM vocabulary.
        token_reduction: `"cotr"` (the paper), `"avg_pool"` (each expert's grid average-pooled to sqrt(N_V)²) or
            `"none"` (every expert resampled to `full_token_grid`², all tokens reach the LLM).
        num_visual_tokens (`int`, default 64): N_V, tokens per image after reduction (with `cotr_budgets`: the
            largest budget).
        cotr_budgets (`list[int]`, optional): elastic CoTR. The visual-token budgets one checkpoint serves, strictly
            increasing and ending at `num_visual_tokens` (e.g. `[1, 4, 16, 64]`); the first k queries are the budget-k
            reducer, and the model reads each image's budget from the length of its block of image tokens (the
            processor's `num_visual_tokens=k`). Default None: one fixed N_V.
        cotr_projection_dim (`int`, default 256): width of CoTR's learned projections.
        cotr_shared_query (`bool`, default False): one query set for all experts instead of one per expert.
        cotr_pooling (default `"mean"`): the self / cross terms pool the expert tokens by mean; `"sum"` is the
            paper's `1·` read literally. The text term is the sum over the prompt either way.
        cotr_text_conditioning (`bool`, default True): False drops the text term (text-free learned queries).
        cotr_text_source (default `"prompt"`): the text tokens CoTR's text term sums. `"prompt"`: every prompt token
            that is not an image token (chat-template tokens included, answers never). `"user"`: only the text blocks
            of the user turns, which the processor marks in `text_condition_mask` (the MMoE router still reads the
            whole prompt). Why the default: docs/design-choices.md.
        cotr_position_embedding (`bool`, default False): a learned, zero-initialised embedding per expert token
            position, added to CoTR's projected tokens (the scores only).
        cotr_score_scaling (default `"pooled_inverse_dim"`): query term unscaled, self / cross / text terms ÷ d_i;
            `"sqrt_dim"`: the whole sum ÷ sqrt(d_i); `"cosine"`: every term a cosine × its own learned scale.
        full_token_grid (`int`, optional): grid side for `token_reduction="none"`; default the first expert's grid.
        projector_hidden_act (`str`, default "gelu"): activation of the 2-layer MLP projector.
        mmoe_target_modules (`list[str]`, default `["down_proj"]`): linear names in the LLM that get MMoE adapters;
            `[]` disables MMoE.
        mmoe_num_experts (`int`, default 3): routed LoRA experts; 0 keeps only the general LoRA.
        mmoe_top_k (`int`, default 1), mmoe_rank (`int`, default 16), mmoe_alpha (`float`, default 32): LoRA scaling is
            alpha / rank.
        mmoe_dropout (`float`, default 0.0): dropout on the LoRA input.
        mmoe_router_hidden_size (`int`, default 128): hidden width of each router MLP.
        mmoe_router_uses_hidden_state (`bool`, default True): route per token on (context, the token); False
            routes per sample on the context alone.
        mmoe_router_token_input (default `"general_lora"`): what a per-token router reads of the token: the general
            LoRA's rank-r projection A_g x, which the layer computes anyway (after the LoRA dropout, in training);
            `"hidden_state"`: the whole input x, through the router's own (in_features × hidden) projection.
        mmoe_router_context (default `"shared"`): one projection of the routing context, computed once per forward,
            feeds every layer's router; `"per_layer"`: each router projects the context itself. The two defaults keep
            the routers at a fraction of the LoRA's size (docs/design-choices.md); a checkpoint saved before these
            options existed loads with `"hidden_state"` and `"per_layer"`, the layout it was trained with.
        mmoe_expert_weighting (default `"softmax"`): a chosen expert's weight is its full-softmax probability
            (Switch); `"renormalized"` renormalises over the top-k (Mixtral).
        mmoe_balance_loss_coef (`float`, default 0.05): weight of the Switch-style load-balancing loss.
        output_router_logits (`bool`, default False): forwards return every MMoE layer's router logits
            (`router_logits`) and the balance loss (`aux_loss`) without labels too, as Mixtral's option.
        output_reduction_weights (`bool`, default False): forwards that reduce images return the reducer's weights
            per vision expert (`reduction_weights`), as `output_attentions` returns attention weights.
    """

    model_type = "leo_mini"
    # the LLM's config is a sub-config, as in transformers' composite VLMs: a requested dtype reaches it
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    vision_experts: list | None = None
    image_size: int = 224
    image_mean: list | None = None
    image_std: list | None = None
    image_token_id: int = 0
    token_reduction: Literal["cotr", "none", "avg_pool"] = "cotr"
    num_visual_tokens: int = 64
    cotr_budgets: list | None = None
    cotr_projection_dim: int = 256
    cotr_shared_query: bool = False
    cotr_pooling: Literal["mean", "sum"] = "mean"
    cotr_text_conditioning: bool = True
    cotr_text_source: Literal["prompt", "user"] = "prompt"
    cotr_position_embedding: bool = False
    cotr_score_scaling: Literal["pooled_inverse_dim", "sqrt_dim", "cosine"] = "pooled_inverse_dim"
    full_token_grid: int | None = None
    projector_hidden_act: str = "gelu"
    mmoe_target_modules: list | None = None
    mmoe_num_experts: int = 3
    mmoe_top_k: int = 1
    mmoe_rank: int = 16
    mmoe_alpha: float = 32.0
    mmoe_dropout: float = 0.0
    mmoe_router_hidden_size: int = 128
    mmoe_router_uses_hidden_state: bool = True
    mmoe_router_token_input: Literal["general_lora", "hidden_state"] = "general_lora"
    mmoe_router_context: Literal["shared", "per_layer"] = "shared"
    mmoe_expert_weighting: Literal["softmax", "renormalized"] = "softmax"
    mmoe_balance_loss_coef: float = 0.05
    output_router_logits: bool = False
    output_reduction_weights: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("format_version", None)  # written by checkpoints before 0.2; nothing reads it
        if self.text_config is not None and not isinstance(self.text_config, (dict, PreTrainedConfig)):
            raise TypeError(f"`text_config` must be a dict or a PreTrainedConfig, got {type(self.text_config).__name__}")
        if self.text_config is None:
            # Only reached when transformers builds a default instance to diff against; never used for a model.
            self.text_config = {"model_type": "llama", "vocab_size": 32, "hidden_size": 8, "intermediate_size": 16,
                                "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1}
        if isinstance(self.text_config, dict):
            text_config = dict(self.text_config)
            if "model_type" not in text_config:
                raise ValueError("`text_config` needs a `model_type` (e.g. 'llama'); pass a complete sub-config.")
            self.text_config = AutoConfig.for_model(text_config.pop("model_type"), **text_config)
        self.vision_experts = [self._normalise_expert(i, e) for i, e in enumerate(self.vision_experts or [])]
        if self.image_mean is None:
            self.image_mean = list(IMAGENET_STANDARD_MEAN)
        if self.image_std is None:
            self.image_std = list(IMAGENET_STANDARD_STD)
        if self.mmoe_target_modules is None:
            self.mmoe_target_modules = ["down_proj"]
        # JSON gives lists; accept tuples alike
        for name in ("image_mean", "image_std", "mmoe_target_modules", "cotr_budgets"):
            if isinstance(getattr(self, name), tuple):
                setattr(self, name, list(getattr(self, name)))
        if self.full_token_grid is None and self.vision_experts:
            self.full_token_grid = _expert_token_grid(self.vision_experts[0])
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        super().__post_init__(**kwargs)
        self.validate_options()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """transformers' `from_dict`; a saved config (it records `transformers_version`) that lacks an option added
        since gets the value it was saved under (`SAVED_BEFORE_OPTION`), not today's default."""
        if "transformers_version" in config_dict:
            config_dict = {**{name: value for name, value in SAVED_BEFORE_OPTION.items() if name not in config_dict},
                           **config_dict}
        return super().from_dict(config_dict, **kwargs)

    @staticmethod
    def _normalise_expert(index: int, expert) -> dict:
        if not isinstance(expert, dict):
            raise TypeError(f"vision_experts[{index}] must be a dict, got {type(expert).__name__}")
        expert = copy.deepcopy(expert)
        if isinstance(expert.get("config"), PreTrainedConfig):
            expert["config"] = expert["config"].to_dict()
        unknown = set(expert) - VISION_EXPERT_KEYS
        if unknown:
            raise ValueError(f"vision_experts[{index}] has unknown keys {sorted(unknown)}; allowed: "
                             f"{sorted(VISION_EXPERT_KEYS)}")
        if not isinstance(expert.get("config"), dict) or "model_type" not in expert["config"]:
            raise ValueError(f"vision_experts[{index}]['config'] must be a complete config dict with a model_type")
        if not isinstance(expert.get("image_size"), int) or expert["image_size"] <= 0:
            raise ValueError(f"vision_experts[{index}]['image_size'] must be a positive int")
        expert.setdefault("feature_layer", None)
        expert.setdefault("num_prefix_tokens", 0)
        expert.setdefault("image_mean", list(IMAGENET_STANDARD_MEAN))
        expert.setdefault("image_std", list(IMAGENET_STANDARD_STD))
        return expert

    def validate_options(self):
        """Raise a `TypeError` or `ValueError` naming the first option of the wrong type or out of range. Every option
        declared above is checked against its annotation here (a `Literal[...]` against its choices), so a type or a
        choice is declared in one place only."""
        for field in dataclasses.fields(self):
            if field.name in LeoMiniConfig.__annotations__ and field.name != "text_config":
                problem = _type_error(field.name, getattr(self, field.name), field.type)
                if problem:
                    error = ValueError if getattr(field.type, "__origin__", None) is Literal else TypeError
                    raise error(f"`{field.name}` {problem}")
        if not all(isinstance(name, str) for name in self.mmoe_target_modules):
            raise TypeError(f"`mmoe_target_modules` must be a list of module names, got {self.mmoe_target_modules!r}")
        for name in POSITIVE_OPTIONS:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)!r}")
        for name in NON_NEGATIVE_OPTIONS:
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.mmoe_dropout < 1:
            raise ValueError(f"`mmoe_dropout` must be in [0, 1), got {self.mmoe_dropout!r}")
        if self.mmoe_num_experts and not 1 <= self.mmoe_top_k <= self.mmoe_num_experts:
            raise ValueError(f"`mmoe_top_k` must be in [1, mmoe_num_experts={self.mmoe_num_experts}], "
                             f"got {self.mmoe_top_k}")
        if self.token_reduction == "avg_pool" and round(self.num_visual_tokens**0.5) ** 2 != self.num_visual_tokens:
            raise ValueError(f"token_reduction='avg_pool' needs a square num_visual_tokens, got {self.num_visual_tokens}")
        if self.cotr_budgets is not None:
            self._validate_cotr_budgets()
        if self.cotr_text_source != "prompt" and not (self.token_reduction == "cotr" and self.cotr_text_conditioning):
            raise ValueError(f"`cotr_text_source`={self.cotr_text_source!r} needs CoTR's text term "
                             "(token_reduction='cotr', cotr_text_conditioning=True)")
        max_positions = getattr(self.text_config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and self.num_image_tokens >= max_positions:
            raise ValueError(f"`num_visual_tokens` gives {self.num_image_tokens} tokens per image: one image would not "
                             f"fit the LLM's {max_positions} positions (max_position_embeddings) with any text")
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab_size:
            raise ValueError(f"`image_token_id` {self.image_token_id} is outside the LLM vocabulary "
                             f"(vocab_size={vocab_size})")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if len(values) != 3 or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
                raise ValueError(f"`{name}` must have 3 finite values (RGB), got {values!r}")
        if min(self.image_std) <= 0:
            raise ValueError(f"`image_std` must be positive, got {self.image_std!r}")

    def _validate_cotr_budgets(self):
        budgets = self.cotr_budgets
        if not budgets or not all(isinstance(k, int) and not isinstance(k, bool) for k in budgets):
            raise TypeError(f"`cotr_budgets` must be a non-empty list of ints, got {budgets!r}")
        if self.token_reduction != "cotr":
            raise ValueError(f"`cotr_budgets` needs token_reduction='cotr' (nested queries), got "
                             f"token_reduction={self.token_reduction!r}")
        if budgets[0] < 1 or any(a >= b for a, b in zip(budgets, budgets[1:])):
            raise ValueError(f"`cotr_budgets` must be positive and strictly increasing, got {budgets!r}")
        if budgets[-1] != self.num_visual_tokens:
            raise ValueError(f"The largest of `cotr_budgets` {budgets!r} must equal num_visual_tokens="
                             f"{self.num_visual_tokens} (the number of queries)")

    @property
    def visual_token_budgets(self) -> list[int]:
        """The tokens per image this model accepts: `cotr_budgets`, or `[num_image_tokens]` for a fixed N_V."""
        return list(self.cotr_budgets) if self.cotr_budgets is not None else [self.num_image_tokens]

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in `input_ids` by default: N_V with CoTR (the largest budget of an elastic
        model) or pooling, the full grid without reduction."""
        if self.token_reduction == "none":
            return self.full_token_grid**2
        return self.num_visual_tokens


__all__ = ["LeoMiniConfig"]
