"""LEO-MINI: vision experts → token reduction (CoTR) → MLP projector → LLM with MMoE LoRA experts (arXiv 2504.04653)."""

import functools
import re
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_leo_mini import LeoMiniConfig
from .mmoe import (MMoE, MMoELinear, MMoERouter, MMoERouterContext, base_linear_key_mapping, load_balancing_loss,
                   recompute_under_saved_routing)
from .token_reduction import ConditionalTokenReduction, build_token_reducer, prompt_text_mask, prompt_text_sum
from .vision_experts import VisionExpert
from .weight_check import (check_folder_complete, check_loaded_weights, checkpoint_keys, checkpoint_weight_files,
                           non_float_weights)

# transformers 5.24 renamed the KV cache argument and output field `past_key_values` → `cache`. The forwards take
# `cache` and accept `past_key_values` too; the installed version's name is the one passed to the LLM and returned.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def accepts_either_cache_name(forward):
    """Let `forward(..., cache=...)` also be called as `forward(..., past_key_values=...)` (transformers < 5.24)."""

    @functools.wraps(forward)
    def forward_with_cache(self, *args, past_key_values: Cache | None = None, **kwargs):
        if past_key_values is not None:
            if kwargs.get("cache") is not None:
                raise ValueError(
                    "Pass the KV cache as `cache` or as `past_key_values` (its name before transformers 5.24), not both"
                )
            kwargs["cache"] = past_key_values
        return forward(self, *args, **kwargs)

    return forward_with_cache


@dataclass
class LeoMiniModelOutputWithPast(BaseModelOutputWithPast):
    """
    last_hidden_state (B, T, d); cache (`past_key_values` before transformers 5.24): the LLM's `Cache`;
    image_hidden_states (n_images, tokens_per_image, d): projected visual tokens that entered the LLM (a batch that
        mixes budgets of an elastic model: image j fills its first k_j rows, the rest are zeros);
    routing_context (B, 2d): pooled prompt text ‖ pooled visual tokens, carried across decode steps;
    router_logits: per MMoE layer, in the LLM's order, the router's logits (B, T or 1, num_experts) in float32, when
        routed experts ran (every forward: the balance loss is computed from them);
    reduction_weights: with `output_reduction_weights`, when images were reduced in this call: per vision expert,
        CoTR's softmax weights (n_images, tokens_per_image, N_i) (an elastic batch: image j fills its first k_j rows);
        None for average pooling and full tokens, whose weights are fixed.
    """

    image_hidden_states: torch.Tensor | None = None
    routing_context: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    reduction_weights: tuple[torch.Tensor, ...] | None = None


@dataclass
class LeoMiniCausalLMOutputWithPast(CausalLMOutputWithPast):
    """loss = LM loss + mmoe_balance_loss_coef · aux_loss (scaled per micro-batch); logits (B, T, V);
    aux_loss: the MMoE load-balancing loss (unweighted), with labels or `output_router_logits`, when routed experts
    ran; router_logits (with `output_router_logits`) and reduction_weights: as in `LeoMiniModelOutputWithPast`."""

    image_hidden_states: torch.Tensor | None = None
    routing_context: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: tuple[torch.Tensor, ...] | None = None
    reduction_weights: tuple[torch.Tensor, ...] | None = None


class ImageTokenBlocks(NamedTuple):
    """How the images of a batch sit in `input_ids`: images_per_sample (B,) and tokens_per_image (n_images,), in the
    order the images' placeholders appear (row by row)."""

    images_per_sample: torch.LongTensor
    tokens_per_image: torch.LongTensor


class ImageTokenRuns(NamedTuple):
    """Maximal runs of consecutive image tokens in input_ids, row by row: rows, starts and lengths, each (R,)."""

    rows: torch.LongTensor
    starts: torch.LongTensor
    lengths: torch.LongTensor


def image_token_runs(input_ids: torch.LongTensor, image_token_id: int) -> ImageTokenRuns:
    """The runs of image tokens in input_ids (B, T): the one place they are found (the model reads images' blocks
    from them; elastic training shortens them)."""
    is_image = nn.functional.pad((input_ids == image_token_id).to(torch.int8), (1, 1))
    edges = is_image[:, 1:] - is_image[:, :-1]  # +1 where a run starts, -1 just after it ends
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()  # row-major order: run r starts and ends
    return ImageTokenRuns(starts[:, 0], starts[:, 1], ends[:, 1] - starts[:, 1])


def block_budgets(lengths: list[int], budgets: list[int], num_images: int) -> list[int]:
    """The budget k of each block of image tokens (a block of L tokens holds L / k adjacent images of budget k) such
    that the blocks hold `num_images` images in all. Raises a `ValueError` when no reading or more than one fits."""
    # readings[r][c]: how many ways (capped at 2) the first r blocks hold c images, and one budget list that does
    readings = [{0: (1, [])}]
    for length in lengths:
        extended = {}
        for count, (ways, chosen) in readings[-1].items():
            for budget in budgets:
                total = count + length // budget
                if length % budget or total > num_images:
                    continue
                previous = extended.get(total, (0, None))
                extended[total] = (min(2, previous[0] + ways), previous[1] or chosen + [budget])
        readings.append(extended)
    ways, chosen = readings[-1].get(num_images, (0, None))
    if ways == 1:
        return chosen
    problem = "cannot hold" if ways == 0 else "can hold in more than one way"
    raise ValueError(
        f"Image tokens and images do not match: input_ids hold blocks of {lengths} image tokens, which {problem} "
        f"{num_images} image(s) at this model's budgets {budgets}. Each image needs a block of one budget's length; "
        "put text between adjacent images whose budgets could be read another way."
    )


class LeoMiniMultiModalProjector(nn.Module):
    """Two-layer MLP from the concatenated expert channels (Σ d_i) to the LLM width."""

    def __init__(self, config: LeoMiniConfig, in_features: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        """(n, N_V, Σ d_i) → (n, N_V, d), in the projector's own dtype (float32 in a float16 load)."""
        return self.linear_2(self.act(self.linear_1(image_features.to(self.linear_1.weight.dtype))))


# The part of LEO-MINI each parameter belongs to, decided by the class of the module that holds it (never by its
# name: an LLM may have `router` modules of its own). MMoE layers name their adapter parameters themselves.
MODULE_PARTS = (
    (VisionExpert, "vision_experts"),
    (ConditionalTokenReduction, "token_reducer"),
    (LeoMiniMultiModalProjector, "projector"),
    (MMoERouter, "mmoe_routers"),
    (MMoERouterContext, "mmoe_routers"),
)
PARAMETER_PARTS = ("vision_experts", "token_reducer", "projector", "mmoe_general_lora", "mmoe_routed_lora",
                   "mmoe_routers", "llm")


class LeoMiniPreTrainedModel(PreTrainedModel):
    config_class = LeoMiniConfig
    config: LeoMiniConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    # device_map="auto": each keeps its parameters on one device (MMoE layers: base weight, LoRA and router together);
    # the LLM's own decoder layers are its `_no_split_modules`
    _no_split_modules = ["ConditionalTokenReduction", "VisionExpert", "MMoELinear"]
    _skip_keys_device_placement = [CACHE_NAME]
    # checkpoints before 0.2 carried unused text projections when `cotr_text_conditioning=False`
    _keys_to_ignore_on_load_unexpected = [r"token_reducer\.text_projections\."]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # A cached decoding step compiles as one graph (tested); a prefill does not: it checks input values once per prompt
    _can_compile_fullgraph = False

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConditionalTokenReduction):
            module.reset_parameters(init=init)
        elif isinstance(module, LeoMiniModel):
            # MMoE layers live inside the LLM, whose own `_init_weights` knows nothing of LoRA.
            module.mmoe.reset_parameters(init=init)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, fresh_parts=(), output_loading_info=False,
                        **kwargs):
        """transformers' `from_pretrained`, refusing a checkpoint that does not fit its config: a missing weight (it
        would be random), a checkpoint weight the model has no place for (a config changed after training), a weight
        stored as integers, or a folder whose save was cut short. `fresh_parts` (parts as in `PARAMETER_PARTS`, e.g.
        `["token_reducer"]`) names parts that may be missing, to start them fresh on purpose."""
        if not set(fresh_parts) <= set(PARAMETER_PARTS):
            raise ValueError(f"fresh_parts must name parts of {PARAMETER_PARTS}, got {list(fresh_parts)}")
        subfolder = kwargs.get("subfolder", "")
        check_folder_complete(pretrained_model_name_or_path, subfolder)

        def weight_files():
            return checkpoint_weight_files(pretrained_model_name_or_path, subfolder, kwargs.get("cache_dir"),
                                           kwargs.get("revision"))

        files = weight_files()
        key_mapping = base_linear_key_mapping(checkpoint_keys(files))  # a checkpoint from before `base_linear`
        if key_mapping:
            kwargs["key_mapping"] = {**key_mapping, **(kwargs.get("key_mapping") or {})}
        model, loading_info = super().from_pretrained(pretrained_model_name_or_path, *model_args,
                                                      output_loading_info=True, **kwargs)
        if not files and base_linear_key_mapping(checkpoint_keys(weight_files())):
            # a Hub checkpoint first downloaded by this call, in the layout from before `base_linear`: load it again,
            # now that its keys can be read
            return cls.from_pretrained(pretrained_model_name_or_path, *model_args, fresh_parts=fresh_parts,
                                       output_loading_info=output_loading_info, **kwargs)
        non_float = {}
        if getattr(model.config, "quantization_config", None) is None:  # quantized weights are integers by design
            files = files or weight_files()
            floating = {name for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
            non_float = {name: dtype for name, dtype in non_float_weights(files).items() if name in floating}
        check_loaded_weights(model.parameter_parts(), loading_info, fresh_parts, non_float)
        return (model, loading_info) if output_loading_info else model

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, **kwargs):
        """transformers' activation checkpointing (non-reentrant), where each recomputed layer routes its MMoE
        adapters on the routing of the forward that saved it (`recompute_under_saved_routing`): the routing travels
        with each call, and the call has ended when the backward pass recomputes."""
        checkpoint_kwargs = dict(activation_checkpointing_kwargs or {})
        if checkpoint_kwargs.setdefault("use_reentrant", False):
            raise ValueError("LEO-MINI's activation checkpointing must be non-reentrant (use_reentrant=False): a "
                             "recomputed MMoE layer needs the routing of its forward, which only torch's non-reentrant "
                             "checkpoint can restore (`context_fn`)")
        checkpoint_kwargs["context_fn"] = functools.partial(recompute_under_saved_routing,
                                                            checkpoint_kwargs.get("context_fn"))
        super().activation_checkpointing_enable(checkpoint_kwargs, **kwargs)

    def parameter_parts(self) -> dict[str, str]:
        """Parameter name → its part, one of `PARAMETER_PARTS`. A parameter belongs to the innermost module of a
        class in `MODULE_PARTS` that holds it, or to the LLM; MMoE layers' adapter parameters to their MMoE part."""
        parts = {}

        def visit(module: nn.Module, prefix: str, part: str) -> None:
            part = next((name for cls, name in MODULE_PARTS if isinstance(module, cls)), part)
            adapter_parts = module.adapter_parameter_parts if isinstance(module, MMoELinear) else {}
            for name, _ in module.named_parameters(recurse=False):
                parts[prefix + name] = adapter_parts.get(name, part)
            for child_name, child in module.named_children():
                visit(child, f"{prefix}{child_name}.", part)

        visit(self, "", "llm")
        return parts


def trained_module_patterns(config: LeoMiniConfig) -> list[str]:
    """Name patterns of LEO-MINI's own modules: CoTR, the projector, and the MMoE adapters (LoRA, routers and the
    routers' shared context projection).

    Declared as transformers' `_keep_in_fp32_modules`, which every quantizer leaves unquantized (and a float16 load
    keeps in float32; each module casts its inputs to its own dtype). An MMoE layer's base linear (`base_linear`) is
    not among them: it follows the requested dtype and quantization like the LLM's other linears and the vision
    experts. Patterns match with or without the top model's `model.` prefix.
    """
    patterns = [r"(model\.)?token_reducer", r"(model\.)?multi_modal_projector", r"(model\.)?mmoe_router_context"]
    if config.mmoe_target_modules:
        targets = "|".join(re.escape(name) for name in config.mmoe_target_modules)
        adapters = "|".join(["router", *MMoELinear.adapter_parameter_parts])
        patterns.append(rf"(model\.)?language_model\..+\.({targets})\.({adapters})")
    return patterns


class LeoMiniModel(LeoMiniPreTrainedModel):
    """The LEO-MINI backbone without the LM head."""

    # loaded from a LeoMiniForConditionalGeneration checkpoint, the backbone has no place for its head
    _keys_to_ignore_on_load_unexpected = [*LeoMiniPreTrainedModel._keys_to_ignore_on_load_unexpected, r"^lm_head\."]

    def __init__(self, config: LeoMiniConfig):
        super().__init__(config)
        if not config.vision_experts:
            raise ValueError("LeoMiniConfig.vision_experts is empty: LEO-MINI needs at least one vision expert")
        attn_implementation = config._attn_implementation  # reaches the LLM and every vision tower
        self.vision_experts = nn.ModuleList(
            VisionExpert(expert, config.image_mean, config.image_std, attn_implementation)
            for expert in config.vision_experts
        )
        expert_hidden_sizes = [expert.hidden_size for expert in self.vision_experts]
        expert_num_tokens = [expert.num_tokens for expert in self.vision_experts]
        self.token_reducer = build_token_reducer(config, expert_hidden_sizes, expert_num_tokens)
        self.multi_modal_projector = LeoMiniMultiModalProjector(config, sum(expert_hidden_sizes))
        self.language_model = AutoModel.from_config(config.text_config, attn_implementation=attn_implementation)
        self.mmoe = MMoE(self.language_model, config, context_dim=2 * config.text_config.hidden_size)
        self.mmoe_router_context = self.mmoe.router_context  # registered here; None when each router projects its own
        self._keep_in_fp32_modules = trained_module_patterns(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, text_sum: torch.Tensor | None = None,
                           tokens_per_image: torch.LongTensor | None = None, output_reduction_weights: bool = False):
        """
        pixel_values (n_images, 3, S, S) as `LeoMiniImageProcessor` makes them; text_sum (n_images, d): the sum of
        each image's prompt text embeddings (`prompt_text_sum`; zeros if None); tokens_per_image (n_images,): each
        image's budget k, one of `config.visual_token_budgets` (default: `num_image_tokens` for every image).
        Returns the projected visual tokens (n_images, max k, d); image j fills its first k_j rows, the rest are zeros.
        With `output_reduction_weights`, (that, the reducer's weights): per expert (n_images, max k, N_i), zeros
        past each image's k (None for pooling and full tokens).
        """
        expert_features = [expert(pixel_values) for expert in self.vision_experts]  # (n, N_i, d_i)
        if text_sum is None:
            text_sum = pixel_values.new_zeros(pixel_values.shape[0], self.config.text_config.hidden_size)
        text_sum = text_sum.to(expert_features[0].dtype)
        if tokens_per_image is not None:
            budgets = tokens_per_image.unique().tolist()
            if len(tokens_per_image) != len(pixel_values) or not set(budgets) <= set(self.config.visual_token_budgets):
                raise ValueError(f"tokens_per_image must hold one of {self.config.visual_token_budgets} per image "
                                 f"({len(pixel_values)} images), got {tokens_per_image.tolist()}")
        if tokens_per_image is None or budgets == [self.config.num_image_tokens]:  # every image at the largest N_V
            reduced, weights = self._reduce(expert_features, text_sum, None, output_reduction_weights)
            image_features = self.multi_modal_projector(reduced)  # (n, N_V, d)
            return (image_features, weights) if output_reduction_weights else image_features
        image_features = weights = None
        for budget in budgets:  # the images of each budget reduce together, with that budget's first k queries
            index = (tokens_per_image == budget).nonzero().squeeze(1)
            reduced, budget_weights = self._reduce([features[index] for features in expert_features], text_sum[index],
                                                   budget, output_reduction_weights)
            projected = self.multi_modal_projector(reduced)  # (n_k, k, d)
            if image_features is None:
                image_features = projected.new_zeros(len(pixel_values), max(budgets), projected.shape[-1])
                if output_reduction_weights:
                    weights = [alpha.new_zeros(len(pixel_values), max(budgets), alpha.shape[-1])
                               for alpha in budget_weights]
            image_features[index, :budget] = projected
            for expert_weights, alpha in zip(weights or [], budget_weights or []):
                expert_weights[index, :budget] = alpha
        return (image_features, weights) if output_reduction_weights else image_features

    def _reduce(self, expert_features, text_sum, budget: int | None, output_weights: bool):
        """(reduced tokens, the reducer's weights or None). The reducer is asked for its weights only when the caller
        wants them, so a forward hook on it sees its tokens otherwise."""
        budget_kwargs = {} if budget is None else {"num_tokens": budget}
        reduced = self.token_reducer(expert_features, text_sum, **budget_kwargs, output_weights=output_weights)
        return reduced if output_weights else (reduced, None)

    def merge_image_features(self, input_ids, inputs_embeds, image_features,
                             tokens_per_image: torch.LongTensor | None = None) -> torch.Tensor:
        """The visual tokens (n_images, tokens_per_image, d) in place of the image placeholders of inputs_embeds;
        with tokens_per_image (n_images,), only the first k_j rows of image j (a mixed-budget batch)."""
        if tokens_per_image is not None and (tokens_per_image != image_features.shape[1]).any():
            rows = torch.arange(image_features.shape[1], device=image_features.device)
            image_features = image_features[rows < tokens_per_image.to(image_features.device).unsqueeze(1)]
        placeholder_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)  # (B, T, 1)
        return inputs_embeds.masked_scatter(placeholder_mask, image_features.to(inputs_embeds.device,
                                                                                 inputs_embeds.dtype))

    def image_token_blocks(self, input_ids: torch.LongTensor, num_images: int) -> ImageTokenBlocks:
        """Which row holds each image and at how many tokens, read from input_ids' blocks of image tokens and checked
        against `num_images`. A fixed-N_V model needs N_V tokens per image. An elastic one (`cotr_budgets`) reads
        each block's budget from its length: a block of L consecutive image tokens is L / k adjacent images of budget
        k, with the k of every block fixed by the image count (`block_budgets`)."""
        budgets = self.config.visual_token_budgets
        if len(budgets) == 1:
            tokens_per_image = budgets[0]
            image_tokens = (input_ids == self.config.image_token_id).sum(dim=1)
            if (image_tokens % tokens_per_image).any() or image_tokens.sum() != num_images * tokens_per_image:
                raise ValueError(
                    f"Image tokens and images do not match: input_ids hold {image_tokens.tolist()} image tokens per "
                    f"row, but {num_images} image(s) need exactly {tokens_per_image} tokens each "
                    f"({num_images * tokens_per_image} in total)"
                )
            images_per_sample = image_tokens // tokens_per_image
            return ImageTokenBlocks(images_per_sample, torch.full((num_images,), tokens_per_image,
                                                                  device=input_ids.device))
        rows, _, lengths = image_token_runs(input_ids, self.config.image_token_id)
        run_budgets = block_budgets(lengths.tolist(), budgets, num_images)
        images_in_run = lengths.cpu() // torch.tensor(run_budgets, dtype=torch.long)
        images_per_sample = torch.zeros(input_ids.shape[0], dtype=torch.long).index_add_(0, rows.cpu(), images_in_run)
        tokens_per_image = torch.tensor(run_budgets, dtype=torch.long).repeat_interleave(images_in_run)
        return ImageTokenBlocks(images_per_sample.to(input_ids.device), tokens_per_image.to(input_ids.device))

    def _validate_inputs(self, input_ids, inputs_embeds, pixel_values, image_features, cache, attention_mask,
                         labels, text_condition_mask) -> None:
        """Every check of a forward's inputs but the image-token blocks (`image_token_blocks` reads and checks those).
        Checks that read tensor values (and so wait for the device) run at prefill, never on a cached decode step."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
                got = getattr(input_ids, "dtype", type(input_ids).__name__)
                raise TypeError(f"input_ids must be an integer torch.Tensor, got {got}")
            if input_ids.dim() != 2 or 0 in input_ids.shape:
                raise ValueError(f"input_ids must have shape (batch, tokens) with both > 0, got "
                                 f"{tuple(input_ids.shape)}")
            batch, num_tokens = input_ids.shape
        else:
            hidden_size = self.config.text_config.hidden_size
            if inputs_embeds.dim() != 3 or 0 in inputs_embeds.shape or inputs_embeds.shape[-1] != hidden_size:
                raise ValueError(f"inputs_embeds must have shape (batch, tokens, {hidden_size}), got "
                                 f"{tuple(inputs_embeds.shape)}")
            batch, num_tokens = inputs_embeds.shape[:2]
        past = 0 if cache is None else cache.get_seq_length()
        if attention_mask is not None and attention_mask.dim() == 2 and (
                attention_mask.shape[0] != batch or attention_mask.shape[1] != past + num_tokens):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected ({batch}, "
                             f"{past + num_tokens}): the cached and the new tokens")
        if labels is not None and tuple(labels.shape) != (batch, num_tokens):
            raise ValueError(f"labels have shape {tuple(labels.shape)}; expected ({batch}, {num_tokens}), like "
                             "input_ids")
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass pixel_values or image_features, not both")
        images = pixel_values if pixel_values is not None else image_features
        if images is not None and input_ids is None:
            raise ValueError("Images need input_ids: their placeholder tokens mark where visual tokens go")
        if pixel_values is not None:
            self._validate_pixel_values(pixel_values)
            self._validate_text_condition_mask(text_condition_mask, batch, num_tokens)
        if past == 0 and input_ids is not None:  # prefill (or generation without a KV cache)
            vocab_size = self.config.text_config.vocab_size
            if input_ids.min() < 0 or input_ids.max() >= vocab_size:
                raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab_size})")
            if images is None and (input_ids == self.config.image_token_id).any():
                raise ValueError(f"input_ids hold image tokens (id {self.config.image_token_id}) but no pixel_values "
                                 "were given: pass the images, or drop their placeholders")

    def _validate_image_features(self, image_features, blocks: ImageTokenBlocks) -> None:
        """Visual tokens passed back (generation without a KV cache) must fill the blocks input_ids hold."""
        if image_features is not None and image_features.shape[1] < int(blocks.tokens_per_image.max()):
            raise ValueError(f"image_features hold {image_features.shape[1]} tokens per image, but input_ids have "
                             f"blocks of up to {int(blocks.tokens_per_image.max())}")

    def _validate_text_condition_mask(self, text_condition_mask, batch: int, num_tokens: int) -> None:
        """CoTR reads `text_condition_mask` exactly when the config's `cotr_text_source` is "user"."""
        if self.config.cotr_text_source == "user":
            if text_condition_mask is None:
                raise ValueError("This model's CoTR conditions on the user's words only (cotr_text_source='user'): "
                                 "pass text_condition_mask, which the processor returns with input_ids")
            if not isinstance(text_condition_mask, torch.Tensor) or tuple(text_condition_mask.shape) != (batch,
                                                                                                        num_tokens):
                got = tuple(text_condition_mask.shape) if isinstance(text_condition_mask, torch.Tensor) else \
                    type(text_condition_mask).__name__
                raise ValueError(f"text_condition_mask must be a tensor of shape ({batch}, {num_tokens}) like "
                                 f"input_ids, got {got}")
        elif text_condition_mask is not None:
            raise ValueError("text_condition_mask is read only by models with cotr_text_source='user'; this model's "
                             f"CoTR sums the whole prompt (cotr_text_source={self.config.cotr_text_source!r})")

    def _validate_pixel_values(self, pixel_values) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.is_meta:
            raise ValueError("pixel_values are on the meta device: they have a shape but no data (move real pixels "
                             "to the model's device)")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor (normalised pixels), got "
                             f"{pixel_values.dtype}")
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size) or not len(pixel_values):
            raise ValueError(
                f"pixel_values must have shape (n_images, 3, {size}, {size}) with n_images > 0 (None for text only), "
                f"got {tuple(pixel_values.shape)}; use LeoMiniImageProcessor to prepare images"
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values hold NaN or infinite values")
        for dtype in {expert.model.dtype for expert in self.vision_experts} - {pixel_values.dtype}:
            if not torch.isfinite(pixel_values.to(dtype)).all():  # e.g. 1e5 into a float16 tower
                raise ValueError(f"pixel_values overflow the vision experts' {dtype} (largest |value| "
                                 f"{pixel_values.abs().max().item():.3g}); LeoMiniImageProcessor's values lie within "
                                 "a few units of 0")

    @accepts_either_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
        routing_context: torch.Tensor | None = None,
        text_condition_mask: torch.Tensor | None = None,
        output_reduction_weights: bool | None = None,
        **kwargs,
    ) -> LeoMiniModelOutputWithPast:
        r"""
        labels (B, T): only used to keep answer tokens out of CoTR's text condition and the routing context.
        image_features (n_images, tokens_per_image, d): projected visual tokens from an earlier call (generation
            without a KV cache passes them back instead of `pixel_values`).
        routing_context (B, 2d): MMoE routing context from the prefill; computed here when None.
        text_condition_mask (B, T): with `cotr_text_source="user"`, True on the user's words, the only text CoTR's
            text term sums (the processor returns it); read only when pixel_values are given.
        output_reduction_weights: return the reducer's weights (`reduction_weights`); default
            `config.output_reduction_weights`.
        cache: the LLM's KV `Cache` (`past_key_values` is accepted too: its name before transformers 5.24).
        """
        if output_reduction_weights is None:
            output_reduction_weights = self.config.output_reduction_weights
        self._validate_inputs(input_ids, inputs_embeds, pixel_values, image_features, cache, attention_mask, labels,
                              text_condition_mask)
        images = pixel_values if pixel_values is not None else image_features
        images_per_sample = tokens_per_image = None
        if images is not None:  # which row holds each image, at how many tokens
            image_blocks = self.image_token_blocks(input_ids, images.shape[0])
            self._validate_image_features(image_features, image_blocks)
            images_per_sample = image_blocks.images_per_sample
            if self.config.cotr_budgets is not None:  # elastic: each image at the budget its block says
                tokens_per_image = image_blocks.tokens_per_image
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, d)
        text_embeds = inputs_embeds  # before the visual tokens are merged in
        text_mask = prompt_text_mask(input_ids, inputs_embeds, attention_mask, labels, self.config.image_token_id)

        reduction_weights = None
        if pixel_values is not None:
            cotr_text_mask = text_mask if text_condition_mask is None else text_mask & text_condition_mask.bool()
            text_sum = prompt_text_sum(text_embeds, cotr_text_mask).repeat_interleave(images_per_sample, dim=0)
            image_features = self.get_image_features(pixel_values, text_sum, tokens_per_image,
                                                     output_reduction_weights=output_reduction_weights)
            if output_reduction_weights:
                image_features, reduction_weights = image_features
        if image_features is not None:
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features, tokens_per_image)

        if routing_context is None:  # at prefill; decoding steps carry the prefill's
            routing_context = self.mmoe.routing_context(text_embeds, text_mask, image_features, images_per_sample,
                                                        tokens_per_image)
        with self.mmoe.routing(routing_context).active() as routing:  # this call's routing, for the LLM's MMoE layers
            outputs = self.language_model(
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                **{CACHE_NAME: cache},
                **kwargs,
            )
        return LeoMiniModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            routing_context=routing_context,
            router_logits=tuple(routing.router_logits.values()) or None,
            reduction_weights=tuple(reduction_weights) if reduction_weights is not None else None,
        )


class LeoMiniForConditionalGeneration(LeoMiniPreTrainedModel, GenerationMixin):
    """LEO-MINI with its LM head: the class `AutoModelForImageTextToText` and the Trainer use."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: LeoMiniConfig):
        super().__init__(config)
        self.model = LeoMiniModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    # The parts, as LLaVA exposes them: code outside the model uses these, never `model.model.<part>`.
    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_experts(self) -> nn.ModuleList:
        return self.model.vision_experts

    @property
    def token_reducer(self) -> nn.Module:
        return self.model.token_reducer

    @property
    def multi_modal_projector(self) -> LeoMiniMultiModalProjector:
        return self.model.multi_modal_projector

    @property
    def mmoe(self) -> MMoE:
        return self.model.mmoe

    def get_image_features(self, pixel_values: torch.Tensor, text_sum: torch.Tensor | None = None,
                           tokens_per_image: torch.LongTensor | None = None, output_reduction_weights: bool = False):
        return self.model.get_image_features(pixel_values, text_sum, tokens_per_image, output_reduction_weights)

    @accepts_either_cache_name
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
        routing_context: torch.Tensor | None = None,
        text_condition_mask: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        output_reduction_weights: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> LeoMiniCausalLMOutputWithPast:
        r"""
        labels (B, T): next-token targets, -100 where no loss is taken (prompt, padding, image tokens).
        output_router_logits: return `router_logits` and `aux_loss` without labels too (default
            `config.output_router_logits`); with labels the balance loss is always computed and added.
        output_reduction_weights: return the reducer's weights (`reduction_weights`) of the images reduced in this call
            (default `config.output_reduction_weights`).
        logits_to_keep: compute logits only for the last `logits_to_keep` positions (0 = all), or for these position
            indices (1-D tensor); with labels, the loss covers the targets of those positions only.
        cache: the LLM's KV `Cache` (`past_key_values` is accepted too: its name before transformers 5.24).
        """
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        check_logits = labels is None and (cache is None or cache.get_seq_length() == 0)  # at prefill, not decoding
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            image_features=image_features,
            routing_context=routing_context,
            text_condition_mask=text_condition_mask,
            output_reduction_weights=output_reduction_weights,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        if check_logits and not torch.isfinite(logits).all():
            raise ValueError(self._non_finite_logits_cause(outputs, pixel_values))

        aux_loss = None
        if outputs.router_logits is not None and (labels is not None or output_router_logits):
            router_probs = [logits.softmax(dim=-1) for logits in outputs.router_logits]
            aux_loss = load_balancing_loss(router_probs, self.config.mmoe_top_k, attention_mask)  # padding skipped
        loss = None
        if labels is not None:
            # position t predicts labels[:, t + 1]: keep the targets of the positions whose logits were computed
            shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)[:, slice_indices].contiguous()
            loss = self.loss_function(
                logits=logits, labels=None, shift_labels=shift_labels, vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
            if aux_loss is not None and self.config.mmoe_balance_loss_coef:
                loss = loss + self.config.mmoe_balance_loss_coef * self._aux_loss_share(
                    aux_loss, labels, num_items_in_batch
                )
        return LeoMiniCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            routing_context=outputs.routing_context,
            aux_loss=aux_loss,
            router_logits=outputs.router_logits if output_router_logits else None,
            reduction_weights=outputs.reduction_weights,
        )

    def _non_finite_logits_cause(self, outputs, pixel_values) -> str:
        """The likely cause of NaN or infinite logits: damaged weights, an overflow in the vision path, or one in
        the LLM."""
        broken = [name for name, param in self.named_parameters() if not torch.isfinite(param).all()]
        if broken:
            return (f"the logits hold NaN or infinite values: {len(broken)} weight tensors do ({broken[:3]}): the "
                    "checkpoint is damaged or its training diverged")
        half = "; load the model in bfloat16 or float32" if self.lm_head.weight.dtype == torch.float16 else ""
        images = outputs.image_hidden_states
        if images is not None and not torch.isfinite(images).all():
            largest = f" (largest |value| {pixel_values.abs().max().item():.3g})" if pixel_values is not None else ""
            return ("the logits hold NaN or infinite values: the visual tokens overflowed; pass pixel_values made by "
                    f"LeoMiniImageProcessor{largest}{half}")
        return f"the logits hold NaN or infinite values: the language model overflowed{half or ' (check its inputs)'}"

    @staticmethod
    def _aux_loss_share(aux_loss, labels, num_items_in_batch):
        """The LM loss is summed over micro-batches when the Trainer passes `num_items_in_batch`; weight this
        micro-batch's aux loss by its share of the label tokens, so the total is a token-weighted mean."""
        if num_items_in_batch is None:
            return aux_loss
        micro_batch_items = (labels[..., 1:] != -100).sum()
        return aux_loss * micro_batch_items.to(aux_loss.dtype) / torch.as_tensor(num_items_in_batch).to(aux_loss)

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Beams / return sequences: repeat each prompt's whole group of images, not each image on its own
        (the default `repeat_interleave` on `pixel_values` mis-assigns images when a prompt has several)."""
        pixel_values = model_kwargs.pop("pixel_values", None)
        if pixel_values is not None and expand_size > 1 and input_ids is not None:
            self.model._validate_pixel_values(pixel_values)
            images_per_sample = self.model.image_token_blocks(input_ids, len(pixel_values)).images_per_sample.tolist()
            groups = pixel_values.split(images_per_sample)
            pixel_values = torch.cat([group for group in groups for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        return input_ids, model_kwargs

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration=False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(
            input_ids, *args, is_first_iteration=is_first_iteration, **kwargs
        )
        # After the prefill, visual tokens and routing context come from the prefill's outputs. Without a KV
        # cache the whole sequence is re-run: reuse the prefill's visual tokens rather than re-reducing the
        # image against a prompt that now contains generated tokens.
        if model_inputs.get("image_features") is not None:
            step_ids = model_inputs.get("input_ids")
            if step_ids is not None and (step_ids == self.config.image_token_id).any():
                model_inputs.pop("pixel_values", None)
            else:
                model_inputs.pop("image_features")
        return model_inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if getattr(outputs, "routing_context", None) is not None:
            model_kwargs["routing_context"] = outputs.routing_context
        if getattr(outputs, "image_hidden_states", None) is not None:
            model_kwargs["image_features"] = outputs.image_hidden_states
        return model_kwargs


__all__ = ["LeoMiniForConditionalGeneration", "LeoMiniModel", "LeoMiniPreTrainedModel"]
