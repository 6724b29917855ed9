"""MMoE-LLM: a frozen linear + an always-on general LoRA + routed LoRA experts, routed on multimodal context.

    y = W x + b + s·B_g A_g x + s·Σ_{e ∈ top-k} w_e · B_e A_e x,      s = alpha / rank

The router sees the per-sample context (pooled prompt text ‖ pooled visual tokens) and, when configured, the
token: the general LoRA's rank-r projection A_g x (default) or the whole hidden state x. The context's projection is
one for all layers (default: `MMoERouterContext`, computed once per forward) or each router's own. B matrices start
at zero, so a fresh model computes exactly its base LLM.

`MMoE` is what the model talks to: it inserts the layers into an LLM and builds each forward's routing context. The
routing of one forward (`MMoERouting`) travels with that call, never on the shared layers: it is active only while the
call's LLM forward runs, in the calling thread (thread-local), so two generations on one model never see each
other's. Each layer records its router logits in it; the model returns them (`router_logits`), and the balance loss
is a plain function of them (`load_balancing_loss`), as in Mixtral.
"""

import contextlib
import math
import threading

import torch
import torch.nn.functional as F
from torch import nn


class MMoERouting:
    """One forward's routing: the context every MMoE layer routes on, and the router logits each layer records.

    Made per call and read by the layers only while `active()`, in the thread that activated it: two calls on one
    model, e.g. two threads generating at once, never see each other's. (Thread-local rather than a ContextVar:
    torch.compile traces thread-local attributes without a graph break, not `ContextVar.set`.) Logits are keyed by
    layer name, so an activation-checkpoint recomputation overwrites instead of adding.
    """

    def __init__(self, context: torch.Tensor):
        self.context = context  # (batch, context_dim), or (batch, router hidden) once projected by MMoERouterContext
        self.router_logits: dict[str, torch.Tensor] = {}  # layer name → (batch, seq or 1, num_experts), float32

    @contextlib.contextmanager
    def active(self):
        """The MMoE layers that run inside this block route on this routing."""
        outer = active_routing()
        ACTIVE.routing = self
        try:
            yield self
        finally:
            ACTIVE.routing = outer


ACTIVE = threading.local()  # .routing: the routing of the LEO-MINI forward running in this thread


def active_routing() -> MMoERouting | None:
    """The routing of the forward running in this thread; None outside a LEO-MINI forward."""
    return getattr(ACTIVE, "routing", None)


def recompute_under_saved_routing(context_fn=None):
    """`context_fn` for `torch.utils.checkpoint` (non-reentrant). A checkpointed layer is recomputed in the backward
    pass, after its forward's routing stopped being active: the recomputation re-activates the routing that was
    active when the layer first ran. `context_fn`: a user's own, whose two contexts are kept."""
    forward_context, recompute_context = context_fn() if context_fn is not None else (contextlib.nullcontext(),
                                                                                    contextlib.nullcontext())
    routing = active_routing()
    if routing is None:
        return forward_context, recompute_context
    return forward_context, entered_together(recompute_context, routing.active())


@contextlib.contextmanager
def entered_together(first, second):
    with first, second:
        yield


class MMoERouterContext(nn.Linear):
    """The routing context's projection shared by every layer's router (`mmoe_router_context="shared"`): applied once
    per forward, (B, context_dim) → (B, router hidden), instead of once in each layer."""

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return super().forward(context.to(self.weight.dtype))  # float32 in a float16 load: the input is upcast


class MMoERouter(nn.Module):
    """Small MLP: logits = W_out act(W_ctx context [+ W_tok token]) over the routed experts.

    `context_proj` is None when the context arrives projected (`MMoERouterContext`); `hidden_proj` reads the token's
    `token_features` (the hidden state, or the general LoRA's rank-r projection of it), None for per-sample routing.
    """

    def __init__(self, context_dim: int | None, token_features: int | None, hidden_size: int, num_experts: int):
        super().__init__()
        self.context_proj = nn.Linear(context_dim, hidden_size) if context_dim else None
        self.hidden_proj = nn.Linear(token_features, hidden_size, bias=False) if token_features else None
        self.out_proj = nn.Linear(hidden_size, num_experts)

    def forward(self, context: torch.Tensor, token_states: torch.Tensor) -> torch.Tensor:
        """context (B, C) raw or (B, hidden) projected, token_states (B, T, token_features) → logits (B, T, E) per
        token, or (B, 1, E) per sample."""
        dtype = self.out_proj.weight.dtype  # float32 in a float16 load: inputs are upcast
        context = context.to(dtype)
        routed = (context if self.context_proj is None else self.context_proj(context)).unsqueeze(1)
        if self.hidden_proj is not None:
            routed = routed + self.hidden_proj(token_states.to(dtype))
        return self.out_proj(F.gelu(routed))


class MMoELinear(nn.Module):
    """An LLM linear (`base_linear`) plus MMoE's LoRA terms, as PEFT's LoRA layers wrap theirs (under another name:
    PEFT takes any module with a `base_layer` for one of its own and would unload it in `merge_and_unload`).

    The base linear stays the LLM's own module: a requested dtype casts it and a quantization backend quantizes or
    replaces it like every other LLM linear. The adapters (general and routed LoRA, the router) are this layer's own
    parameters and keep their own dtype (float32 in a float16 load: `trained_module_patterns`).
    """

    # The adapter parameters this layer adds, and the part of the model each belongs to (as PEFT's LoRA layers
    # declare `adapter_layer_names`); `base_linear` stays the base LLM's. The router is an `MMoERouter`.
    adapter_parameter_parts = {"general_lora_A": "mmoe_general_lora", "general_lora_B": "mmoe_general_lora",
                               "experts_lora_A": "mmoe_routed_lora", "experts_lora_B": "mmoe_routed_lora"}

    def __init__(self, base_linear: nn.Linear, config, context_dim: int, name: str):
        super().__init__()
        self.base_linear = base_linear
        self.in_features, self.out_features = base_linear.in_features, base_linear.out_features
        rank, num_experts = config.mmoe_rank, config.mmoe_num_experts
        self.scaling = config.mmoe_alpha / rank
        self.top_k = config.mmoe_top_k
        self.expert_weighting = config.mmoe_expert_weighting
        self.layer_name = name
        factory = {"device": base_linear.weight.device, "dtype": base_linear.weight.dtype}
        self.dropout = nn.Dropout(config.mmoe_dropout)
        self.general_lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.general_lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.num_experts = num_experts
        # the router reads A_g x, which the general LoRA computes anyway, instead of projecting x itself
        self.router_reads_general_lora = config.mmoe_router_token_input == "general_lora"
        if num_experts:
            self.experts_lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, **factory))
            self.experts_lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, **factory))
            token_features = None
            if config.mmoe_router_uses_hidden_state:
                token_features = rank if self.router_reads_general_lora else self.in_features
            own_context = context_dim if config.mmoe_router_context == "per_layer" else None
            self.router = MMoERouter(own_context, token_features, config.mmoe_router_hidden_size,
                                     num_experts).to(**factory)
        self.reset_lora_parameters()

    def reset_lora_parameters(self, init=nn.init):
        """A: uniform ±1/sqrt(in_features) (PEFT's Kaiming default), B: zero — the layer starts equal to its base.

        `init` may be `transformers.initialization`, whose functions skip tensors loaded from a checkpoint.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        init.uniform_(self.general_lora_A, -bound, bound)
        init.zeros_(self.general_lora_B)
        if self.num_experts:
            init.uniform_(self.experts_lora_A, -bound, bound)
            init.zeros_(self.experts_lora_B)

    def expert_weights(self, token_states: torch.Tensor) -> torch.Tensor:
        """Dense (B, T or 1, E) weights, non-zero on each token's top-k experts, from the router's token input
        (B, T, in_features or rank); records the router's logits in the active routing."""
        routing = active_routing()
        if routing is None or routing.context.shape[0] != token_states.shape[0]:
            raise ValueError(
                f"MMoE layer {self.layer_name} has no routing context for a batch of {token_states.shape[0]}; "
                "call it through LeoMiniModel, which makes each forward's routing active while the LLM runs."
            )
        logits = self.router(routing.context, token_states).float()
        routing.router_logits[self.layer_name] = logits
        probs = logits.softmax(dim=-1)
        top_probs, top_experts = probs.topk(self.top_k, dim=-1)
        if self.expert_weighting == "renormalized":
            top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, top_experts, top_probs).to(token_states.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states (B, T, in_features) → (B, T, out_features), in the input's dtype. The base linear computes as
        loaded (cast or quantized); the LoRA terms in the adapters' own dtype, added to the base output there.

        Each LoRA product is one `F.linear` on the (E·r)-flattened experts, whatever E: at a decoding step (T = 1)
        the layer's cost is its number of small operations, which this keeps down."""
        input_dtype = hidden_states.dtype
        output = self.base_linear(hidden_states)
        hidden_states = hidden_states.to(self.general_lora_A.dtype)
        lora_input = self.dropout(hidden_states) if self.training else hidden_states
        general_hidden = F.linear(lora_input, self.general_lora_A)  # (B, T, r)
        lora_output = F.linear(general_hidden, self.general_lora_B)  # (B, T, out)
        if self.num_experts:
            weights = self.expert_weights(general_hidden if self.router_reads_general_lora else hidden_states)
            expert_hidden = F.linear(lora_input, self.experts_lora_A.flatten(0, 1))  # (B, T, E·r), expert-major
            expert_hidden = expert_hidden.unflatten(-1, (self.num_experts, -1)) * weights.unsqueeze(-1)
            experts_lora_B = self.experts_lora_B.permute(1, 0, 2).flatten(1)  # (out, E·r), expert-major
            lora_output = lora_output + F.linear(expert_hidden.flatten(-2), experts_lora_B)
        return torch.add(output.to(lora_output.dtype), lora_output, alpha=self.scaling).to(input_dtype)


def base_linear_key_mapping(checkpoint_keys) -> dict[str, str]:
    """`key_mapping` for `from_pretrained` from a checkpoint saved before MMoE layers wrapped their base linear.

    Such a checkpoint holds an MMoE layer's base weight beside its adapters (`...down_proj.weight` next to
    `...down_proj.general_lora_A`); today's layer holds it in `base_linear` (`...down_proj.base_linear.weight`).
    Returns {old key: new key} for exactly those keys ({} for a checkpoint in today's layout). (transformers keeps the
    mapping on the loaded model and saves it in the layout it was loaded from.)
    """
    keys = set(checkpoint_keys)
    mapping = {}
    for key in keys:
        if key.endswith(".general_lora_A"):
            layer = key.removesuffix("general_lora_A")
            mapping.update({layer + name: f"{layer}base_linear.{name}" for name in ("weight", "bias")
                            if layer + name in keys})
    return mapping


class MMoE:
    """The MMoE adapters of one LLM: inserted at construction; each forward routes them through its own
    `MMoERouting`.

    Not an `nn.Module`: the layers are registered where they sit in the LLM (so checkpoint keys keep the LLM's
    names), the shared context projection (`router_context`) by the model that owns the LLM; this object only keeps
    them.
    """

    def __init__(self, language_model: nn.Module, config, context_dim: int):
        """Wrap every `nn.Linear` of `language_model` named in `config.mmoe_target_modules` in an `MMoELinear`; with
        routed experts and `mmoe_router_context="shared"`, make the one `MMoERouterContext` their routers read."""
        targets = set(config.mmoe_target_modules)
        self.layers: list[MMoELinear] = []
        for parent_name, parent in list(language_model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if child_name in targets and type(child) is nn.Linear:
                    full_name = f"{parent_name}.{child_name}" if parent_name else child_name
                    layer = MMoELinear(child, config, context_dim, full_name)
                    setattr(parent, child_name, layer)
                    self.layers.append(layer)
        if targets and not self.layers:
            raise ValueError(f"mmoe_target_modules {sorted(targets)} match no nn.Linear in "
                             f"{type(language_model).__name__}")
        self.router_context = None
        if self.layers and config.mmoe_num_experts and config.mmoe_router_context == "shared":
            weight = self.layers[0].general_lora_A
            self.router_context = MMoERouterContext(context_dim, config.mmoe_router_hidden_size,
                                                    device=weight.device, dtype=weight.dtype)

    def routing(self, context: torch.Tensor) -> MMoERouting:
        """One forward's routing on `context` (B, context_dim): projected here, once, when the routers share the
        projection."""
        if self.router_context is not None:
            context = self.router_context(context)
        return MMoERouting(context)

    def reset_parameters(self, init=nn.init) -> None:
        """LoRA A uniform, B zero in every layer (`init` may be `transformers.initialization`)."""
        for layer in self.layers:
            layer.reset_lora_parameters(init=init)

    @staticmethod
    def routing_context(text_embeds, text_mask, image_features, images_per_sample,
                        tokens_per_image=None) -> torch.Tensor:
        """(B, 2d): mean prompt-text embedding ‖ mean visual token of the sample's images (zeros if none).

        text_embeds (B, T, d) and text_mask (B, T) as CoTR's; image_features (n_images, tokens, d) or None;
        images_per_sample (B,) or None; tokens_per_image (n_images,): each image's rows (an elastic model's budgets;
        the rows past them are zeros), or None when every image fills all rows.
        """
        text_mask = text_mask.unsqueeze(-1).to(text_embeds.dtype)
        text_mean = (text_embeds * text_mask).sum(dim=1) / text_mask.sum(dim=1).clamp(min=1)
        visual_mean = torch.zeros_like(text_mean)
        if image_features is not None:
            sample_of_image = torch.repeat_interleave(
                torch.arange(text_embeds.shape[0], device=text_embeds.device), images_per_sample
            )
            if tokens_per_image is None:
                per_image = image_features.mean(dim=1).to(text_mean.dtype)
            else:
                per_image = (image_features.sum(dim=1) / tokens_per_image.unsqueeze(-1).to(image_features)).to(
                    text_mean.dtype)
            visual_mean = visual_mean.index_add(0, sample_of_image, per_image)
            visual_mean = visual_mean / images_per_sample.clamp(min=1).unsqueeze(-1).to(visual_mean.dtype)
        return torch.cat([text_mean, visual_mean], dim=-1)


def load_balancing_loss(router_probs: list[torch.Tensor], top_k: int, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-style, differentiable: E · Σ_e f_e · P_e averaged over layers (1.0 when perfectly balanced).

    router_probs: per layer (B, T, E) probabilities (T = 1 for per-sample routing); token_mask: (B, T) or None.
    f_e is the fraction of top-k assignments to expert e (no gradient), P_e the mean probability (gradient).
    """
    losses = []
    for probs in router_probs:
        num_experts = probs.shape[-1]
        if token_mask is not None and token_mask.shape == probs.shape[:2]:
            probs = probs[token_mask.bool()]
        probs = probs.reshape(-1, num_experts)
        assignments = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=1).float()
        fraction_routed = assignments.mean(dim=0) / top_k
        mean_prob = probs.mean(dim=0)
        losses.append(num_experts * (fraction_routed * mean_prob).sum())
    return torch.stack(losses).mean()
