"""LEO-MINI configuration."""

import copy

from transformers import AutoConfig, PreTrainedConfig

from .presets import LEO_MINI_PRESETS


FORMAT_VERSION = 1

TOKEN_REDUCTIONS = ("cotr", "none", "avg_pool")
COTR_SCORE_SCALINGS = ("pooled_inverse_dim", "sqrt_dim", "cosine")
COTR_POOLINGS = ("mean", "sum")
MMOE_EXPERT_WEIGHTINGS = ("softmax", "renormalized")
VISION_EXPERT_KEYS = {"config", "image_size", "feature_layer", "num_prefix_tokens", "image_mean", "image_std"}


def _expert_token_grid(expert: dict) -> int:
    """Side of an expert's output grid, from its config alone (patch models: size / patch; CNNs: size / 32)."""
    patch_size = expert["config"].get("patch_size")
    stride = patch_size if patch_size else 32
    return max(1, expert["image_size"] // stride)


class LeoMiniConfig(PreTrainedConfig):
    r"""
    Configuration of a LEO-MINI model: vision experts → CoTR → MLP projector → LLM with MMoE LoRA experts.

    Where the paper is ambiguous the choice is an option; the defaults and the reasons are given per option.

    Args:
        text_config (`dict` or `PreTrainedConfig`):
            Complete config of any causal LM (`AutoModel.from_config` must build it). Required.
        vision_experts (`list[dict]`):
            One dict per vision expert with keys `config` (complete transformers config dict incl. `model_type`),
            `image_size` (its input side), `feature_layer` (`None` = last hidden state, int = index into
            `hidden_states`), `num_prefix_tokens` (CLS / register tokens dropped from the front), `image_mean`,
            `image_std` (its input normalisation).
        image_size, image_mean, image_std:
            The canonical `pixel_values` every expert is resized and re-normalised from (as EAGLE does).
        image_token_id (`int`): placeholder token id; must be inside the LLM vocabulary.
        token_reduction (`"cotr"`, `"none"` or `"avg_pool"`):
            `"none"` is the full-token baseline: every expert is resampled to a `full_token_grid`² grid and all
            tokens reach the LLM. `"avg_pool"` is a text-agnostic baseline at the same budget: each expert's grid
            is average-pooled to sqrt(N_V) x sqrt(N_V) (N_V must be a square).
        num_visual_tokens (`int`, default 64): N_V, tokens per image after CoTR (the paper's main model).
        cotr_projection_dim (`int`, default 256): width of CoTR's learned projections (one reading of the paper).
        cotr_shared_query (`bool`, default False): one set of learned queries shared by all experts instead of
            one per expert. Default per expert: the paper writes Q̂_i with the expert index.
        cotr_pooling (default `"mean"`): how the self / cross / text terms pool over positions. `"sum"` is the
            paper's `1·` read literally; `"mean"` divides by the number of tokens. Measured on real ImageNet
            MobileNetV2 features (non-negative, 196 tokens), `"sum"` collapses at init (all 16 queries on 2 of
            196 tokens, entropy 2.5 of 5.3) and after training (entropy 0.67; colour questions at chance), so the
            default is `"mean"`, which keeps the pooled terms independent of the token count. The text term is a
            sum over the prompt's tokens either way (signed embeddings, a few dozen tokens: no collapse, and a mean
            would shrink the weakest term further).
        cotr_text_conditioning (`bool`, default True): include the text term s_text. False gives text-free
            learned queries (self and cross terms kept): the text-agnostic ablation of CoTR.
        cotr_position_embedding (`bool`, default False): add a learned embedding per token position of each
            expert to CoTR's projected tokens Î_i (so to the scores only; the outputs stay mixes of the
            unprojected tokens). Zero-initialised: training starts from plain CoTR. The paper mentions none (its
            ViT experts' features already carry position); a CNN expert's features carry little, and without
            it CoTR cannot select tokens by location ("the shape in the top-left").
        cotr_score_scaling (default `"pooled_inverse_dim"`): `"pooled_inverse_dim"` scales the self / cross /
            text terms by 1/d_i and leaves the query term unscaled; `"sqrt_dim"` scales the whole sum by
            1/sqrt(d_i). The pooled terms are sums over hundreds of tokens: with `"sqrt_dim"` the softmax
            collapses at init (all N_V outputs pick one token), so the default is the reading that trains.
            `"cosine"` (not in the paper) makes every term a cosine between L2-normalised vectors times its own
            learned scale (init sqrt(p / 4), at most 100): with `"pooled_inverse_dim"` the self term, quadratic in the
            visual projection, grew to dominate after training and the text term (÷ d_i) could not move the
            attention (benchmarks/results/cotr_cell_attention.md).
        full_token_grid (`int`, optional): grid side used when `token_reduction="none"`; default: the first
            expert's grid.
        projector_hidden_act (`str`, default "gelu"): activation of the 2-layer MLP projector (LLaVA-1.5).
        mmoe_target_modules (`list[str]`, default `["down_proj"]`): linear names in every decoder layer that get
            MMoE adapters; `[]` disables MMoE.
        mmoe_num_experts (`int`, default 3): routed LoRA experts; 0 leaves only the general LoRA (ablation).
        mmoe_top_k (`int`, default 1), mmoe_rank (`int`, default 16), mmoe_alpha (`float`, default 32):
            LoRA scaling is alpha / rank.
        mmoe_router_hidden_size (`int`, default 128): hidden width of the router MLP.
        mmoe_router_uses_hidden_state (`bool`, default True): route per token on (context, hidden state); False
            routes per sample on the text + visual context only. The paper's router sees visual tokens, text
            tokens and the hidden state, so per-token is the default.
        mmoe_expert_weighting (default `"softmax"`): weight of a selected expert is its full-softmax probability
            (Switch); `"renormalized"` renormalises over the top-k (Mixtral). With top-1, renormalising makes every
            weight 1 and leaves the router no gradient from the task loss, hence the default.
        mmoe_balance_loss_coef (`float`, default 0.05): weight of the Switch-style load-balancing loss.
        format_version (`int`): layout version of checkpoints written with this config.
    """

    model_type = "leo_mini"
    sub_configs_defaults = {}

    text_config: dict | PreTrainedConfig | None = None
    vision_experts: list | None = None
    image_size: int = 224
    image_mean: list | None = None
    image_std: list | None = None
    image_token_id: int = 0
    token_reduction: str = "cotr"
    num_visual_tokens: int = 64
    cotr_projection_dim: int = 256
    cotr_shared_query: bool = False
    cotr_pooling: str = "mean"
    cotr_text_conditioning: bool = True
    cotr_position_embedding: bool = False
    cotr_score_scaling: str = "pooled_inverse_dim"
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
    mmoe_expert_weighting: str = "softmax"
    mmoe_balance_loss_coef: float = 0.05
    tie_word_embeddings: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self, **kwargs):
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
            self.image_mean = [0.5, 0.5, 0.5]
        if self.image_std is None:
            self.image_std = [0.5, 0.5, 0.5]
        if self.mmoe_target_modules is None:
            self.mmoe_target_modules = ["down_proj"]
        if self.full_token_grid is None and self.vision_experts:
            self.full_token_grid = _expert_token_grid(self.vision_experts[0])
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True
        super().__post_init__(**kwargs)
        self.validate_options()

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
        expert.setdefault("image_mean", [0.5, 0.5, 0.5])
        expert.setdefault("image_std", [0.5, 0.5, 0.5])
        return expert

    def validate_options(self):
        """Raise a `ValueError` naming the first option that is out of range."""
        choices = {
            "token_reduction": TOKEN_REDUCTIONS,
            "cotr_score_scaling": COTR_SCORE_SCALINGS,
            "cotr_pooling": COTR_POOLINGS,
            "mmoe_expert_weighting": MMOE_EXPERT_WEIGHTINGS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("num_visual_tokens", "cotr_projection_dim", "mmoe_rank", "mmoe_router_hidden_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive int, got {getattr(self, name)!r}")
        if self.mmoe_num_experts < 0:
            raise ValueError(f"`mmoe_num_experts` must be >= 0, got {self.mmoe_num_experts}")
        if self.mmoe_num_experts and not 1 <= self.mmoe_top_k <= self.mmoe_num_experts:
            raise ValueError(f"`mmoe_top_k` must be in [1, mmoe_num_experts={self.mmoe_num_experts}], "
                             f"got {self.mmoe_top_k}")
        if self.token_reduction == "avg_pool" and round(self.num_visual_tokens**0.5) ** 2 != self.num_visual_tokens:
            raise ValueError(f"token_reduction='avg_pool' needs a square num_visual_tokens, got {self.num_visual_tokens}")
        vocab_size = self.text_config.vocab_size
        if not 0 <= self.image_token_id < vocab_size:
            raise ValueError(f"`image_token_id` {self.image_token_id} is outside the LLM vocabulary "
                             f"(vocab_size={vocab_size})")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("`image_mean` and `image_std` must have 3 values (RGB)")

    @property
    def num_image_tokens(self) -> int:
        """Tokens each image occupies in `input_ids`: N_V with CoTR or pooling, the full grid without reduction."""
        if self.token_reduction == "none":
            return self.full_token_grid**2
        return self.num_visual_tokens

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LeoMiniConfig":
        """Build a named configuration (`tiny`, `leo-mini-llama3-8b`), with top-level options overridden."""
        if name not in LEO_MINI_PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(LEO_MINI_PRESETS)}")
        kwargs = LEO_MINI_PRESETS[name]()
        kwargs.update(overrides)
        return cls(**kwargs)


__all__ = ["LeoMiniConfig"]
