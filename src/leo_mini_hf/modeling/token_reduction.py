"""Token reduction: each expert's visual tokens → the tokens per image that reach the LLM.

Every reducer maps `(expert_features, text_sum) -> (n_images, tokens_per_image, Σ d_i)`, experts concatenated
channel-wise; with `output_weights=True` it returns `(tokens, weights)` too, as `nn.MultiheadAttention` does with
`need_weights`: CoTR its softmax weights per expert, the fixed reducers None.
- `ConditionalTokenReduction` (CoTR, LEO-MINI Sec. 3): N_V soft mixes per expert, conditioned on all experts and on
  the prompt text;
- `AveragePooling`: each expert's grid average-pooled to sqrt(N_V)² (the text-agnostic baseline);
- `FullTokens`: every expert's grid resampled to `full_token_grid`² (no reduction; LLaVA).

CoTR, for expert i with tokens I_i (N_i × d_i) and learned projections (hat):
    s_query = Q̂_i Î_iᵀ                          (N_V × N_i)
    s_self  = (Σ_n Î_i,n) Î_iᵀ                    (1 × N_i)
    s_cross = (Σ_{j≠i} Σ_n Î_j,n) Î_iᵀ            (1 × N_i)
    s_text  = (Σ_t T̂_t) Î_iᵀ                      (1 × N_i)
    α_i = softmax over N_i of the scaled sum;   Ī_i = α_i I_i   (N_V × d_i, the UNprojected tokens)
With `cotr_pooling="mean"` each visual Σ is divided by its number of tokens (the text Σ stays a sum over the prompt);
with `cotr_position_embedding` a learned P_i (N_i × p) is added to Î_i. `cotr_score_scaling` sets each term's factor
(`term_scales`); with "cosine" every vector is L2-normalised first. Every pooled term sums first, so the cost is
O(N·d): no N × N matrix is ever formed. `tests/test_token_reduction.py` checks this against the literal equations.
Elastic CoTR (`cotr_budgets`): the queries are nested, so the budget-k reducer is the first k query rows Q̂_i[:k]; each
query row's softmax is independent of the others, so budget k's tokens are the first k of the full budget's.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

SCORE_TERMS = ("query", "self", "cross", "text")
MAX_COSINE_SCALE = 100.0  # τ is clamped here, as CLIP clamps its logit scale: every logit stays within ±4·100


def prompt_text_mask(input_ids, inputs_embeds, attention_mask, labels, image_token_id: int) -> torch.Tensor:
    """(B, T) True on the prompt text T that conditions CoTR and the MMoE router: not image tokens, not padding and
    not answer tokens (labels != -100), so the answer never leaks into the visual tokens or the routing. Nor the
    tokens after a sample's last answer (the chat template's closing newline): they do not exist when the model
    generates, so a training sample and its generation sum the same prompt text."""
    if input_ids is not None:
        mask = input_ids != image_token_id
    else:
        mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = mask & attention_mask.bool()
    if labels is not None:
        labelled = labels != -100
        positions = torch.arange(labels.shape[1], device=labels.device)
        last_answer = torch.where(labelled, positions, -1).amax(dim=1, keepdim=True)  # (B, 1); -1: no answer
        mask = mask & ~labelled & ((positions <= last_answer) | (last_answer < 0))
    return mask


def prompt_text_sum(text_embeds: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Σ_t T_t over each sample's prompt text: text_embeds (B, T, d), text_mask (B, T) → (B, d)."""
    return (text_embeds * text_mask.unsqueeze(-1).to(text_embeds.dtype)).sum(dim=1)


def tokens_as_grid(features: torch.Tensor, expert_index: int) -> torch.Tensor:
    """(n, side², C) → (n, C, side, side), row-major, for grid-based reducers."""
    num_tokens = features.shape[1]
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"Vision expert {expert_index} yields {num_tokens} tokens, not a square grid; it cannot be "
                         "resampled or pooled (use token_reduction='cotr')")
    return features.transpose(1, 2).reshape(features.shape[0], features.shape[2], side, side)


class FullTokens(nn.Module):
    """`token_reduction="none"`: every expert's token grid resampled (bilinear) to `full_token_grid`²."""

    def __init__(self, config, expert_hidden_sizes: list[int], expert_num_tokens: list[int]):
        super().__init__()
        self.grid_size = config.full_token_grid

    def forward(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor, output_weights: bool = False):
        """expert_features: per expert (n, N_i, d_i); text_sum is unused. → (n, full_token_grid², Σ d_i); with
        `output_weights`, (that, None): a fixed resampling has no weights of its own."""
        resampled = []
        for index, features in enumerate(expert_features):
            if features.shape[1] != self.grid_size**2:
                grid = F.interpolate(tokens_as_grid(features, index), size=(self.grid_size, self.grid_size),
                                     mode="bilinear", align_corners=False)
                features = grid.flatten(2).transpose(1, 2)
            resampled.append(features)
        tokens = torch.cat(resampled, dim=-1)
        return (tokens, None) if output_weights else tokens


class AveragePooling(nn.Module):
    """`token_reduction="avg_pool"`: every expert's token grid average-pooled to sqrt(N_V)² (text-agnostic)."""

    def __init__(self, config, expert_hidden_sizes: list[int], expert_num_tokens: list[int]):
        super().__init__()
        self.grid_size = math.isqrt(config.num_visual_tokens)

    def forward(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor, output_weights: bool = False):
        """expert_features: per expert (n, N_i, d_i); text_sum is unused. → (n, N_V, Σ d_i); with
        `output_weights`, (that, None): fixed pooling windows, not weights a model learned."""
        pooled = [F.adaptive_avg_pool2d(tokens_as_grid(features, index), self.grid_size).flatten(2).transpose(1, 2)
                  for index, features in enumerate(expert_features)]
        tokens = torch.cat(pooled, dim=-1)
        return (tokens, None) if output_weights else tokens


class ConditionalTokenReduction(nn.Module):
    """CoTR: reduces each expert's tokens to `num_visual_tokens`, conditioned on all experts and the prompt text."""

    def __init__(self, config, expert_hidden_sizes: list[int], expert_num_tokens: list[int] | None = None):
        super().__init__()
        projection_dim = config.cotr_projection_dim
        self.expert_hidden_sizes = list(expert_hidden_sizes)
        self.score_scaling = config.cotr_score_scaling
        self.mean_pooling = config.cotr_pooling == "mean"
        self.visual_projections = nn.ModuleList(
            nn.Linear(hidden_size, projection_dim, bias=False) for hidden_size in expert_hidden_sizes
        )
        self.text_projections = None  # None: the text-free learned-queries ablation (no text term)
        if config.cotr_text_conditioning:
            self.text_projections = nn.ModuleList(
                nn.Linear(config.text_config.hidden_size, projection_dim, bias=False) for _ in expert_hidden_sizes
            )
        num_query_sets = 1 if config.cotr_shared_query else len(expert_hidden_sizes)
        self.queries = nn.Parameter(torch.empty(num_query_sets, config.num_visual_tokens, projection_dim))
        self.log_score_scales = None
        if self.score_scaling == "cosine":  # log τ per expert and term, in SCORE_TERMS order
            self.log_score_scales = nn.Parameter(torch.empty(len(expert_hidden_sizes), len(SCORE_TERMS)))
        self.position_embeddings = None
        if config.cotr_position_embedding:  # per expert (N_i, p), added to Î_i
            if expert_num_tokens is None or len(expert_num_tokens) != len(expert_hidden_sizes):
                raise ValueError("cotr_position_embedding needs every expert's token count (expert_num_tokens)")
            self.position_embeddings = nn.ParameterList(
                nn.Parameter(torch.empty(num_tokens, projection_dim)) for num_tokens in expert_num_tokens
            )
        self.reset_parameters()

    def reset_parameters(self, init=nn.init):
        """Xavier-uniform queries and projections, zero position embeddings, cosine scales τ = sqrt(p / 4): the cosine
        of two random p-vectors has standard deviation 1/sqrt(p), so the four terms' sum spreads like one scaled
        dot-product attention logit (std ~1). `init` may be `transformers.initialization`."""
        init.xavier_uniform_(self.queries)
        if self.log_score_scales is not None:
            init.constant_(self.log_score_scales, 0.5 * math.log(self.queries.shape[-1] / len(SCORE_TERMS)))
        for projection in [*self.visual_projections, *(self.text_projections or [])]:
            init.xavier_uniform_(projection.weight)
        for position_embedding in self.position_embeddings or []:
            init.zeros_(position_embedding)

    def term_scales(self, expert_index: int) -> torch.Tensor:
        """(4,) the factor on each score term (query, self, cross, text) of expert `expert_index`."""
        inverse_dim = 1.0 / self.expert_hidden_sizes[expert_index]
        if self.score_scaling == "pooled_inverse_dim":  # query term unscaled, pooled terms ÷ d_i
            return self.queries.new_tensor([1.0, inverse_dim, inverse_dim, inverse_dim])
        if self.score_scaling == "sqrt_dim":  # the whole sum ÷ sqrt(d_i)
            return self.queries.new_full((len(SCORE_TERMS),), math.sqrt(inverse_dim))
        return self.log_score_scales[expert_index].exp().clamp(max=MAX_COSINE_SCALE)  # cosine: learned τ per term

    def _score_parts(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor, num_tokens: int | None):
        """Per expert i: (Q̂_i[:k] (k, p), Î_i (n, N_i, p), the pooled vectors of the self, cross and text terms
        [(n, p), ...], the four factors (4,)), every vector L2-normalised with cosine scores."""
        num_tokens = self.queries.shape[1] if num_tokens is None else num_tokens
        normalise = F.normalize if self.score_scaling == "cosine" else (lambda vectors, dim: vectors)
        projected = [proj(features) for proj, features in zip(self.visual_projections, expert_features)]  # (n, N_i, p)
        if self.position_embeddings is not None:
            projected = [tokens + position for tokens, position in zip(projected, self.position_embeddings)]
        pooled = [tokens.mean(dim=1) if self.mean_pooling else tokens.sum(dim=1) for tokens in projected]  # (n, p)
        pooled_all_experts = torch.stack(pooled).sum(dim=0)  # (n, p)
        for i, tokens in enumerate(projected):
            query = self.queries[min(i, self.queries.shape[0] - 1), :num_tokens]  # Q̂_i: (k, p)
            pooled_terms = [pooled[i], pooled_all_experts - pooled[i]]  # self Σ Î_i, cross Σ_{j≠i} Î_j: (n, p) each
            if self.text_projections is not None:
                pooled_terms.append(self.text_projections[i](text_sum))  # text Σ_t T̂_t = Ŵ(Σ_t T_t)
            yield (normalise(query, dim=-1), normalise(tokens, dim=-1),
                   [normalise(term, dim=-1) for term in pooled_terms], self.term_scales(i))

    def score_terms(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor,
                    num_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
        """Each score term times its factor, per expert, as the equations write them: "query" (n, k, N_i); "self",
        "cross" and "text" (n, 1, N_i) ("text" absent without a text term). α_i is the softmax of their sum
        (`expert_attention` computes the three pooled terms in one product: the same up to float rounding)."""
        terms = []
        for query, tokens, pooled_terms, scales in self._score_parts(expert_features, text_sum, num_tokens):
            expert_terms = {"query": scales[0] * torch.einsum("qp,nkp->nqk", query, tokens)}
            for name, scale, term in zip(SCORE_TERMS[1:], scales[1:], pooled_terms):
                expert_terms[name] = scale * torch.einsum("np,nkp->nk", term, tokens).unsqueeze(1)
            terms.append(expert_terms)
        return terms

    def expert_attention(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor,
                         num_tokens: int | None = None) -> list[torch.Tensor]:
        """Softmax weights α_i per expert: list of (n_images, k, N_i), k = `num_tokens` (default N_V): the first k
        queries."""
        weights = []
        for query, tokens, pooled_terms, scales in self._score_parts(expert_features, text_sum, num_tokens):
            s_query = scales[0] * torch.einsum("qp,nkp->nqk", query, tokens)  # (n, k, N_i)
            # s_self + s_cross + s_text in one product: Σ_term c_term (u_term · Î_i,n) = (Σ_term c_term u_term) · Î_i,n
            pooled_vector = sum(scale * term for scale, term in zip(scales[1:], pooled_terms))
            s_pooled = torch.einsum("np,nkp->nk", pooled_vector, tokens).unsqueeze(1)  # (n, 1, N_i)
            scores = s_query + s_pooled  # (n, k, N_i); the softmax runs in float32 in a half-precision model
            softmax_dtype = torch.promote_types(scores.dtype, torch.float32)
            weights.append(scores.to(softmax_dtype).softmax(dim=-1).to(scores.dtype))
        return weights

    def forward(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor, num_tokens: int | None = None,
                output_weights: bool = False):
        """
        expert_features: per expert (n_images, N_i, d_i); text_sum: (n_images, d_text), the sum of the text-token
        embeddings of each image's prompt (`prompt_text_sum`); num_tokens: the budget k ≤ N_V (default N_V).
        Returns (n_images, k, Σ d_i), experts concatenated channel-wise, in CoTR's own dtype (float32 in a float16
        load, where the inputs are upcast); with `output_weights`, (that, α): per expert the softmax weights
        (n_images, k, N_i).
        """
        if num_tokens is not None and not 1 <= num_tokens <= self.queries.shape[1]:
            raise ValueError(f"CoTR has {self.queries.shape[1]} queries; cannot reduce to {num_tokens} tokens")
        dtype = self.queries.dtype
        expert_features = [features.to(dtype) for features in expert_features]
        weights = self.expert_attention(expert_features, text_sum.to(dtype), num_tokens)
        reduced = [torch.bmm(alpha, features) for alpha, features in zip(weights, expert_features)]
        tokens = torch.cat(reduced, dim=-1)
        return (tokens, weights) if output_weights else tokens


TOKEN_REDUCERS = {"cotr": ConditionalTokenReduction, "avg_pool": AveragePooling, "none": FullTokens}


def build_token_reducer(config, expert_hidden_sizes: list[int], expert_num_tokens: list[int]) -> nn.Module:
    """The reducer `config.token_reduction` names."""
    return TOKEN_REDUCERS[config.token_reduction](config, expert_hidden_sizes, expert_num_tokens)
