"""LEO-MINI: vision experts → CoTR → MLP projector → LLM with MMoE LoRA experts (arXiv 2504.04653)."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_leo_mini import LeoMiniConfig
from .cotr import ConditionalTokenReduction
from .mmoe import MMoELinear, MMoERoutingState, add_mmoe_adapters, load_balancing_loss
from .vision_experts import VisionExpert


# transformers 5.24 renamed the KV cache argument and output field `past_key_values` → `cache`. The forwards accept
# both names; the installed version's name is the one passed to the LLM and returned.
CACHE_NAME = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The KV cache passed as `cache` (transformers >= 5.24) or as `past_key_values` (earlier versions)."""
    if cache is not None and past_key_values is not None:
        raise ValueError(
            "Pass the KV cache as `cache` or as `past_key_values` (its name before transformers 5.24), not both"
        )
    return cache if cache is not None else past_key_values


@dataclass
class LeoMiniModelOutputWithPast(BaseModelOutputWithPast):
    """
    last_hidden_state (B, T, d); cache (`past_key_values` before transformers 5.24): the LLM's `Cache`;
    image_hidden_states (n_images, tokens_per_image, d): projected visual tokens that entered the LLM;
    routing_context (B, 2d): pooled prompt text ‖ pooled visual tokens, carried across decode steps;
    aux_loss: MMoE load-balancing loss (unweighted), when routed experts ran.
    """

    image_hidden_states: torch.Tensor | None = None
    routing_context: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


@dataclass
class LeoMiniCausalLMOutputWithPast(CausalLMOutputWithPast):
    """loss = LM loss + mmoe_balance_loss_coef · aux_loss (scaled per micro-batch); logits (B, T, V)."""

    image_hidden_states: torch.Tensor | None = None
    routing_context: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class LeoMiniMultiModalProjector(nn.Module):
    """Two-layer MLP from the concatenated expert channels (Σ d_i) to the LLM width."""

    def __init__(self, config: LeoMiniConfig, in_features: int):
        super().__init__()
        hidden_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


class LeoMiniPreTrainedModel(PreTrainedModel):
    config_class = LeoMiniConfig
    config: LeoMiniConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["ConditionalTokenReduction", "VisionExpert"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ConditionalTokenReduction):
            module.reset_parameters(init=init)
        elif isinstance(module, LeoMiniModel):
            # MMoE layers live inside the LLM, whose own `_init_weights` knows nothing of LoRA.
            for layer in module.language_model.modules():
                if isinstance(layer, MMoELinear):
                    layer.reset_lora_parameters(init=init)


class LeoMiniModel(LeoMiniPreTrainedModel):
    """The LEO-MINI backbone without the LM head."""

    def __init__(self, config: LeoMiniConfig):
        super().__init__(config)
        if not config.vision_experts:
            raise ValueError("LeoMiniConfig.vision_experts is empty: LEO-MINI needs at least one vision expert")
        self.vision_experts = nn.ModuleList(
            VisionExpert(expert, config.image_mean, config.image_std) for expert in config.vision_experts
        )
        expert_hidden_sizes = [expert.hidden_size for expert in self.vision_experts]
        expert_num_tokens = [expert.num_tokens for expert in self.vision_experts]
        self.token_reducer = (
            ConditionalTokenReduction(config, expert_hidden_sizes, expert_num_tokens)
            if config.token_reduction == "cotr" else None
        )
        self.multi_modal_projector = LeoMiniMultiModalProjector(config, sum(expert_hidden_sizes))
        self.language_model = AutoModel.from_config(config.text_config)
        self.routing_state = MMoERoutingState()
        text_hidden_size = config.text_config.hidden_size
        add_mmoe_adapters(self.language_model, config, 2 * text_hidden_size, self.routing_state)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def get_image_features(self, pixel_values: torch.Tensor, text_sum: torch.Tensor | None = None) -> torch.Tensor:
        """
        pixel_values (n_images, 3, S, S); text_sum (n_images, d): sum of each image's prompt text embeddings
        (zeros if None). Returns projected visual tokens
        (n_images, num_image_tokens, d).
        """
        self._check_pixel_values(pixel_values)
        expert_features = [expert(pixel_values) for expert in self.vision_experts]  # (n, N_i, d_i)
        if self.config.token_reduction == "none":
            grid = self.config.full_token_grid
            image_features = torch.cat(
                [expert.resample_to_grid(f, grid) for expert, f in zip(self.vision_experts, expert_features)], dim=-1
            )
        elif self.config.token_reduction == "avg_pool":
            grid = round(self.config.num_visual_tokens**0.5)
            image_features = torch.cat(
                [expert.average_pool(f, grid) for expert, f in zip(self.vision_experts, expert_features)], dim=-1
            )
        else:
            if text_sum is None:
                text_sum = pixel_values.new_zeros(pixel_values.shape[0], self.config.text_config.hidden_size)
            image_features = self.token_reducer(expert_features, text_sum.to(expert_features[0].dtype))
        return self.multi_modal_projector(image_features)

    def _check_pixel_values(self, pixel_values):
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a floating-point tensor (normalised pixels), got {pixel_values.dtype}")
        size = self.config.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must have shape (n_images, 3, {size}, {size}), got {tuple(pixel_values.shape)}; "
                "use LeoMiniImageProcessor to prepare images"
            )

    def images_per_sample(self, input_ids: torch.LongTensor, num_images: int) -> torch.LongTensor:
        """(B,) number of images each row holds, checked against the placeholder tokens and `num_images`."""
        tokens_per_image = self.config.num_image_tokens
        image_tokens = (input_ids == self.config.image_token_id).sum(dim=1)
        if (image_tokens % tokens_per_image).any() or image_tokens.sum() != num_images * tokens_per_image:
            raise ValueError(
                f"Image tokens and images do not match: input_ids hold {image_tokens.tolist()} image tokens per "
                f"row, but {num_images} image(s) need exactly {tokens_per_image} tokens each "
                f"({num_images * tokens_per_image} in total)"
            )
        return image_tokens // tokens_per_image

    def text_condition_mask(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """(B, T) True on prompt text: not image tokens, not padding, and not answer tokens (labels != -100)."""
        mask = input_ids != self.config.image_token_id
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask & attention_mask.bool()
        if labels is not None:
            mask = mask & (labels == -100)
        return mask

    def routing_context(self, text_embeds, text_mask, image_features, images_per_sample) -> torch.Tensor:
        """(B, 2d): mean prompt-text embedding ‖ mean visual token of the sample's images (zeros if none)."""
        text_mask = text_mask.unsqueeze(-1).to(text_embeds.dtype)
        text_mean = (text_embeds * text_mask).sum(dim=1) / text_mask.sum(dim=1).clamp(min=1)
        visual_mean = torch.zeros_like(text_mean)
        if image_features is not None:
            sample_of_image = torch.repeat_interleave(
                torch.arange(text_embeds.shape[0], device=text_embeds.device), images_per_sample
            )
            per_image = image_features.mean(dim=1).to(text_mean.dtype)
            visual_mean = visual_mean.index_add(0, sample_of_image, per_image)
            visual_mean = visual_mean / images_per_sample.clamp(min=1).unsqueeze(-1).to(visual_mean.dtype)
        return torch.cat([text_mean, visual_mean], dim=-1)

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
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LeoMiniModelOutputWithPast:
        r"""
        labels (B, T): only used to keep answer tokens out of CoTR's text condition and the routing context.
        image_features (n_images, tokens_per_image, d): projected visual tokens from an earlier call (generation
            without a KV cache passes them back instead of `pixel_values`).
        routing_context (B, 2d): MMoE routing context from the prefill; computed here when None.
        cache: the LLM's KV `Cache`; `past_key_values` is the same argument under its pre-5.24 name.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds")
        if input_ids is None and (pixel_values is not None or image_features is not None):
            raise ValueError("Images need input_ids: their placeholder tokens mark where visual tokens go")
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass pixel_values or image_features, not both")
        if pixel_values is not None:
            self._check_pixel_values(pixel_values)
        if input_ids is not None:
            vocab_size = self.config.text_config.vocab_size
            if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
                raise ValueError(f"input_ids hold ids outside the vocabulary [0, {vocab_size})")
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (B, T, d)
            text_mask = self.text_condition_mask(input_ids, attention_mask, labels)
        else:
            text_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
            if attention_mask is not None and attention_mask.dim() == 2:
                text_mask = attention_mask.bool()

        text_embeds = inputs_embeds  # before visual tokens are scattered in
        images_per_sample = None
        if pixel_values is not None or image_features is not None:
            num_images = (pixel_values if pixel_values is not None else image_features).shape[0]
            images_per_sample = self.images_per_sample(input_ids, num_images)
        if pixel_values is not None:
            text_sum = (text_embeds * text_mask.unsqueeze(-1).to(inputs_embeds.dtype)).sum(dim=1)  # (B, d)
            image_features = self.get_image_features(pixel_values, text_sum.repeat_interleave(images_per_sample, 0))
        if image_features is not None:
            image_token_mask = (input_ids == self.config.image_token_id).unsqueeze(-1)
            inputs_embeds = inputs_embeds.masked_scatter(
                image_token_mask, image_features.to(inputs_embeds.device, inputs_embeds.dtype)
            )

        if routing_context is None:
            routing_context = self.routing_context(text_embeds, text_mask, image_features, images_per_sample)
        token_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if token_mask is not None and token_mask.shape[1] != inputs_embeds.shape[1]:
            token_mask = None  # decoding with a cache: the mask covers past tokens too
        self.routing_state.start(routing_context, token_mask)

        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            **{CACHE_NAME: resolve_cache_argument(cache, past_key_values)},
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        aux_loss = None
        if self.routing_state.router_probs:
            aux_loss = load_balancing_loss(
                list(self.routing_state.router_probs.values()), self.config.mmoe_top_k, token_mask
            )
        return LeoMiniModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=image_features,
            routing_context=routing_context,
            aux_loss=aux_loss,
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

    def get_image_features(self, pixel_values: torch.Tensor, text_sum: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.get_image_features(pixel_values, text_sum)

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
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> LeoMiniCausalLMOutputWithPast:
        r"""
        labels (B, T): next-token targets, -100 where no loss is taken (prompt, padding, image tokens).
        logits_to_keep: compute logits only for the last `logits_to_keep` positions (0 = all), or for these position
            indices (1-D tensor); with labels, the loss covers the targets of those positions only.
        cache: the LLM's KV `Cache`; `past_key_values` is the same argument under its pre-5.24 name.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            labels=labels,
            image_features=image_features,
            routing_context=routing_context,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])

        loss = None
        if labels is not None:
            # position t predicts labels[:, t + 1]: keep the targets of the positions whose logits were computed
            shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)[:, slice_indices].contiguous()
            loss = self.loss_function(
                logits=logits, labels=None, shift_labels=shift_labels, vocab_size=self.config.text_config.vocab_size,
                num_items_in_batch=num_items_in_batch,
            )
            if outputs.aux_loss is not None and self.config.mmoe_balance_loss_coef:
                loss = loss + self.config.mmoe_balance_loss_coef * self._aux_loss_share(
                    outputs.aux_loss, labels, num_items_in_batch
                )
        return LeoMiniCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            routing_context=outputs.routing_context,
            aux_loss=outputs.aux_loss,
        )

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
            self.model._check_pixel_values(pixel_values)
            images_per_sample = self.model.images_per_sample(input_ids, pixel_values.shape[0]).tolist()
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
