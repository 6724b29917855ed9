"""CoTR: conditional token reduction (LEO-MINI, Sec. 3).

For expert i with tokens I_i (N_i × d_i) and learned projections (hat):
    s_query = Q̂_i Î_iᵀ                          (N_V × N_i)
    s_self  = (Σ_n Î_i,n) Î_iᵀ                    (1 × N_i)
    s_cross = (Σ_{j≠i} Σ_n Î_j,n) Î_iᵀ            (1 × N_i)
    s_text  = (Σ_t T̂_t) Î_iᵀ                      (1 × N_i)
(with `cotr_pooling="mean"`, each visual Σ is divided by its number of tokens — the text Σ stays a sum over the
prompt; with `cotr_position_embedding`, a learned P_i (N_i × p) is added to Î_i)
    α_i = softmax over N_i of the scaled sum;   Ī_i = α_i I_i   (N_V × d_i, the UNprojected tokens)
With `cotr_score_scaling="cosine"` every term is instead a cosine (both vectors L2-normalised) times its own learned
scale τ_i,term, so no term can drown the others by its norm: s = Σ_term τ_i,term cos(u_term, Î_i,n).
Every pooled term sums first, so the cost is O(N·d): no N × N matrix is ever formed.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

SCORE_TERMS = ("query", "self", "cross", "text")
MAX_COSINE_SCALE = 100.0  # τ is clamped here, as CLIP clamps its logit scale: every logit stays within ±4·100


class ConditionalTokenReduction(nn.Module):
    """Reduces each expert's tokens to `num_visual_tokens`, conditioned on all experts and the prompt text."""

    def __init__(self, config, expert_hidden_sizes: list[int], expert_num_tokens: list[int] | None = None):
        super().__init__()
        projection_dim = config.cotr_projection_dim
        text_hidden_size = config.text_config.hidden_size
        self.expert_hidden_sizes = list(expert_hidden_sizes)
        self.score_scaling = config.cotr_score_scaling
        self.text_conditioning = config.cotr_text_conditioning
        self.mean_pooling = config.cotr_pooling == "mean"
        self.visual_projections = nn.ModuleList(
            nn.Linear(hidden_size, projection_dim, bias=False) for hidden_size in expert_hidden_sizes
        )
        self.text_projections = nn.ModuleList(
            nn.Linear(text_hidden_size, projection_dim, bias=False) for _ in expert_hidden_sizes
        )
        num_query_sets = 1 if config.cotr_shared_query else len(expert_hidden_sizes)
        self.queries = nn.Parameter(torch.empty(num_query_sets, config.num_visual_tokens, projection_dim))
        self.log_score_scales = None
        if self.score_scaling == "cosine":  # log τ per expert and term (query, self, cross, text)
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
        for projection in [*self.visual_projections, *self.text_projections]:
            init.xavier_uniform_(projection.weight)
        for position_embedding in self.position_embeddings or []:
            init.zeros_(position_embedding)

    def expert_attention(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor) -> list[torch.Tensor]:
        """Softmax weights α_i per expert: list of (n_images, N_V, N_i)."""
        projected = [proj(features) for proj, features in zip(self.visual_projections, expert_features)]  # (n, N_i, p)
        if self.position_embeddings is not None:
            projected = [tokens + position for tokens, position in zip(projected, self.position_embeddings)]
        pooled = [tokens.sum(dim=1) for tokens in projected]  # Σ_n Î_i,n: (n, p)
        if self.mean_pooling:
            pooled = [total / tokens.shape[1] for total, tokens in zip(pooled, projected)]
        pooled_all_experts = torch.stack(pooled).sum(dim=0)  # (n, p)
        weights = []
        for i, tokens in enumerate(projected):
            query = self.queries[min(i, self.queries.shape[0] - 1)]  # (N_V, p)
            pooled_terms = [pooled[i], pooled_all_experts - pooled[i]]  # self, cross: (n, p) each
            if self.text_conditioning:  # False: the text-free learned-queries ablation
                pooled_terms.append(self.text_projections[i](text_sum))  # Σ_t T̂_t = Ŵ(Σ_t T_t)
            pooled_terms = torch.stack(pooled_terms, dim=1)  # (n, terms, p)
            if self.score_scaling == "cosine":
                scales = self.log_score_scales[i].exp().clamp(max=MAX_COSINE_SCALE)  # (4,), SCORE_TERMS order
                tokens = F.normalize(tokens, dim=-1)
                query = scales[0] * F.normalize(query, dim=-1)
                pooled_terms = scales[1:1 + pooled_terms.shape[1], None] * F.normalize(pooled_terms, dim=-1)
            s_query = torch.einsum("qp,nkp->nqk", query, tokens)  # (n, N_V, N_i)
            # s_self + s_cross + s_text in one product: Σ_term (u_term · Î_i,n) = (Σ_term u_term) · Î_i,n
            s_pooled = torch.einsum("np,nkp->nk", pooled_terms.sum(dim=1), tokens).unsqueeze(1)  # (n, 1, N_i)
            hidden_size = self.expert_hidden_sizes[i]
            if self.score_scaling == "sqrt_dim":
                scores = (s_query + s_pooled) / math.sqrt(hidden_size)
            elif self.score_scaling == "pooled_inverse_dim":
                scores = s_query + s_pooled / hidden_size
            else:  # "cosine": the learned scales already set each term's size
                scores = s_query + s_pooled
            weights.append(scores.softmax(dim=-1))
        return weights

    def forward(self, expert_features: list[torch.Tensor], text_sum: torch.Tensor) -> torch.Tensor:
        """
        expert_features: per expert (n_images, N_i, d_i); text_sum: (n_images, d_text), the sum of the prompt's
        text-token embeddings for each image's prompt.
        Returns (n_images, N_V, Σ d_i), experts concatenated channel-wise.
        """
        weights = self.expert_attention(expert_features, text_sum)
        reduced = [torch.bmm(alpha, features) for alpha, features in zip(weights, expert_features)]
        return torch.cat(reduced, dim=-1)
