"""Token reduction: CoTR against a slow, literal implementation of the paper's equations and its behaviour at init;
the average-pooling and full-token reducers; which tokens form the prompt text."""

import math

import pytest
import torch

from helpers.tiny_models import image_prompt, random_pixels, tiny_config, tiny_model
from leo_mini_hf.modeling.token_reduction import AveragePooling, ConditionalTokenReduction, FullTokens, build_token_reducer


def literal_cotr(module: ConditionalTokenReduction, expert_features, text_tokens, scaling, pooling="sum"):
    """Slow reference: per image, builds the N×N similarity matrices the equations write down and sums them."""
    outputs = []
    for image_index in range(expert_features[0].shape[0]):
        projected = [module.visual_projections[i](f[image_index]) for i, f in enumerate(expert_features)]
        if module.position_embeddings is not None:
            projected = [tokens + module.position_embeddings[i] for i, tokens in enumerate(projected)]
        reduced = []
        for i, tokens_i in enumerate(projected):
            num_tokens, d_i = expert_features[i].shape[1], expert_features[i].shape[2]
            ones = torch.ones(1, num_tokens, dtype=tokens_i.dtype)
            query = module.queries[0] if module.queries.shape[0] == 1 else module.queries[i]
            s_query = query @ tokens_i.T
            s_self = ones @ (tokens_i @ tokens_i.T)
            s_cross = torch.zeros(1, num_tokens, dtype=tokens_i.dtype)
            for j, tokens_j in enumerate(projected):
                if j != i:
                    s_cross = s_cross + torch.ones(1, tokens_j.shape[0], dtype=tokens_i.dtype) @ (tokens_j @ tokens_i.T)
            text_projected = module.text_projections[i](text_tokens[image_index])  # (L, p)
            s_text = torch.ones(1, text_projected.shape[0], dtype=tokens_i.dtype) @ (text_projected @ tokens_i.T)
            if pooling == "mean":
                s_self = s_self / num_tokens
                s_cross = sum(torch.ones(1, t.shape[0], dtype=t.dtype) @ (t @ tokens_i.T) / t.shape[0]
                              for j, t in enumerate(projected) if j != i)
            if scaling == "cosine":  # each term ÷ the norms of its two vectors, × its learned scale
                def pooled_vector(tokens):  # the Σ (or mean) the term dots with the tokens: (1, p)
                    total = torch.ones(1, tokens.shape[0], dtype=tokens.dtype) @ tokens
                    return total / tokens.shape[0] if pooling == "mean" else total

                token_norms = tokens_i.norm(dim=-1)
                cross_vector = sum(pooled_vector(t) for j, t in enumerate(projected) if j != i)
                scales = module.log_score_scales[i].exp()
                scores = (scales[0] * s_query / (query.norm(dim=-1, keepdim=True) * token_norms)
                          + scales[1] * s_self / (pooled_vector(tokens_i).norm() * token_norms)
                          + scales[2] * s_cross / (cross_vector.norm() * token_norms)
                          + scales[3] * s_text / ((torch.ones(1, text_projected.shape[0], dtype=tokens_i.dtype)
                                             @ text_projected).norm() * token_norms))
            elif scaling == "sqrt_dim":
                scores = (s_query + s_self + s_cross + s_text) / math.sqrt(d_i)
            else:
                scores = s_query + (s_self + s_cross + s_text) / d_i
            alpha = torch.softmax(scores, dim=-1)
            reduced.append(alpha @ expert_features[i][image_index])
        outputs.append(torch.cat(reduced, dim=-1))
    return torch.stack(outputs)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("scaling", ["pooled_inverse_dim", "sqrt_dim", "cosine"])
@pytest.mark.parametrize("shared_query", [False, True])
@pytest.mark.parametrize("position", [False, True])
def test_cotr_matches_literal_equations(scaling, shared_query, pooling, position):
    torch.manual_seed(0)
    config = tiny_config(cotr_score_scaling=scaling, cotr_shared_query=shared_query, num_visual_tokens=5,
                         cotr_pooling=pooling, cotr_position_embedding=position)
    module = ConditionalTokenReduction(config, [12, 20, 8], [9, 16, 4]).double()
    torch.nn.init.normal_(module.queries)
    for position_embedding in module.position_embeddings or []:
        torch.nn.init.normal_(position_embedding)
    if module.log_score_scales is not None:  # distinct scales, so a term paired with the wrong one would show
        torch.nn.init.uniform_(module.log_score_scales, -1.0, 2.0)
    expert_features = [torch.randn(2, n, d, dtype=torch.double) for n, d in [(9, 12), (16, 20), (4, 8)]]
    text_tokens = torch.randn(2, 7, config.text_config.hidden_size, dtype=torch.double)

    fast = module(expert_features, text_tokens.sum(dim=1))
    slow = literal_cotr(module, expert_features, text_tokens, scaling, pooling)

    assert fast.shape == (2, 5, 12 + 20 + 8)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # the terms one by one (what the benchmarks' probes read) make the same weights
    terms = module.score_terms(expert_features, text_tokens.sum(dim=1))
    assert [sorted(expert_terms) for expert_terms in terms] == [["cross", "query", "self", "text"]] * 3
    by_terms = [sum(expert_terms.values()).softmax(dim=-1) @ features
                for expert_terms, features in zip(terms, expert_features)]
    torch.testing.assert_close(torch.cat(by_terms, dim=-1), slow, rtol=1e-10, atol=1e-10)


def test_position_embeddings_let_cotr_tell_identical_tokens_apart():
    """Tokens equal at every position (a CNN feature map of a flat region) get uniform weights without position
    embeddings, whatever the queries; with them (once trained away from their zero init) the weights differ."""
    config = tiny_config(num_visual_tokens=2, cotr_position_embedding=True)
    module = ConditionalTokenReduction(config, [6], [9])
    assert module.position_embeddings[0].shape == (9, config.cotr_projection_dim)
    assert not module.position_embeddings[0].any()  # starts as plain CoTR
    flat = torch.randn(1, 1, 6).expand(1, 9, 6)
    text_sum = torch.randn(1, config.text_config.hidden_size)
    torch.testing.assert_close(module.expert_attention([flat], text_sum)[0], torch.full((1, 2, 9), 1 / 9))
    with torch.no_grad():
        module.position_embeddings[0].normal_()
    weights = module.expert_attention([flat], text_sum)[0]
    assert weights.max() > 2 / 9
    with pytest.raises(ValueError, match="expert_num_tokens"):
        ConditionalTokenReduction(config, [6])


def test_position_embedding_and_cosine_scale_model_round_trip(tmp_path):
    from leo_mini_hf import LeoMiniForConditionalGeneration

    model = tiny_model(cotr_position_embedding=True, cotr_score_scaling="cosine")
    with torch.no_grad():
        model.model.token_reducer.position_embeddings[0].normal_()
        model.model.token_reducer.log_score_scales.uniform_(0.0, 3.0)  # differs from the init a load would redo
    model.save_pretrained(tmp_path)
    reloaded = LeoMiniForConditionalGeneration.from_pretrained(tmp_path).eval()
    config = model.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config)}
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits)


def test_cotr_output_is_convex_combination_of_unprojected_tokens():
    torch.manual_seed(0)
    config = tiny_config(num_visual_tokens=3)
    module = ConditionalTokenReduction(config, [6])
    features = torch.randn(1, 10, 6)
    text_sum = torch.randn(1, config.text_config.hidden_size)
    weights = module.expert_attention([features], text_sum)[0]
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 3))
    torch.testing.assert_close(module([features], text_sum), weights @ features)


def _init_statistics(scaling, pooling="sum"):
    """α at init, paper-sized (N=576, d=1024, projection 256, N_V=64): mean row entropy, mean L1 distance
    between rows, and the largest cosine similarity between two reduced tokens."""
    torch.manual_seed(0)
    config = tiny_config(cotr_score_scaling=scaling, num_visual_tokens=64, cotr_projection_dim=256,
                         cotr_pooling=pooling)
    module = ConditionalTokenReduction(config, [1024, 1024])
    features = [torch.randn(1, 576, 1024), torch.randn(1, 576, 1024)]
    text_sum = torch.randn(1, 20, config.text_config.hidden_size).sum(1)
    alpha = module.expert_attention(features, text_sum)[0][0]  # (64, 576)
    entropy = -(alpha * alpha.clamp_min(1e-30).log()).sum(-1).mean().item()
    row_distance = torch.cdist(alpha, alpha, p=1).mean().item()
    reduced = torch.nn.functional.normalize(alpha @ features[0][0], dim=-1)
    cosine = (reduced @ reduced.T)[~torch.eye(64, dtype=torch.bool)]
    return entropy, row_distance, cosine.max().item()


@pytest.mark.parametrize("pooling", ["sum", "mean"])
@pytest.mark.parametrize("scaling", ["pooled_inverse_dim", "cosine"])
def test_scalings_that_train_do_not_collapse_at_init(scaling, pooling):
    entropy, row_distance, max_cosine = _init_statistics(scaling, pooling)
    assert entropy > 0.8 * math.log(576)
    assert row_distance > 0.1
    assert max_cosine < 0.99


def test_sqrt_dim_scaling_with_sums_collapses_at_init_as_documented():
    entropy, row_distance, max_cosine = _init_statistics("sqrt_dim", "sum")
    assert entropy < 0.3 * math.log(576)
    assert row_distance < 0.01
    assert max_cosine > 0.999


def test_answer_tokens_cannot_change_visual_tokens():
    model = tiny_model()
    config = model.config
    prompt = image_prompt(config)
    pixels = random_pixels(config)
    features = []
    for answer in ([20, 21, 2], [30, 31, 2]):
        input_ids = torch.tensor([prompt + answer])
        labels = torch.full_like(input_ids, -100)
        labels[0, len(prompt):] = input_ids[0, len(prompt):]
        features.append(model(input_ids=input_ids, pixel_values=pixels, labels=labels).image_hidden_states)
    torch.testing.assert_close(features[0], features[1], rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_forward_conditions_cotr_on_the_sum_of_the_prompt_text_embeddings(pooling):
    """The text term is Σ_t T_t over the prompt's text tokens (not image tokens, padding or answer) whatever
    `cotr_pooling` says about the visual terms."""
    model = tiny_model(cotr_pooling=pooling)
    config = model.config
    prompt, answer = image_prompt(config), [20, 21]
    input_ids = torch.tensor([[config.text_config.pad_token_id or 0] + prompt + answer])
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 0] = 0
    labels = torch.full_like(input_ids, -100)
    labels[0, -len(answer):] = input_ids[0, -len(answer):]
    pixels = random_pixels(config)
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels)
    text_ids = torch.tensor([token for token in prompt if token != config.image_token_id])
    text_sum = model.get_input_embeddings()(text_ids).sum(dim=0, keepdim=True)
    torch.testing.assert_close(outputs.image_hidden_states, model.get_image_features(pixels, text_sum))
    mean_instead = model.get_image_features(pixels, text_sum / len(text_ids))
    assert not torch.allclose(outputs.image_hidden_states, mean_instead)


def test_prompt_text_does_change_visual_tokens():
    model = tiny_model()
    config = model.config
    pixels = random_pixels(config)
    first = model(input_ids=torch.tensor([image_prompt(config, text_after=(12, 13))]), pixel_values=pixels)
    second = model(input_ids=torch.tensor([image_prompt(config, text_after=(50, 60))]), pixel_values=pixels)
    assert not torch.allclose(first.image_hidden_states, second.image_hidden_states)


def test_cosine_scores_are_bounded_by_their_learned_scales():
    """Whatever the norms of the features, text and projections, each term of a logit is at most its scale τ (so
    no term can drown the others by growing), and τ itself is clamped."""
    torch.manual_seed(0)
    config = tiny_config(cotr_score_scaling="cosine", num_visual_tokens=3)
    module = ConditionalTokenReduction(config, [6, 4]).double()  # double: weights down to e^-800 stay > 0
    with torch.no_grad():
        module.visual_projections[0].weight.mul_(1e4)  # a self term that would dominate any dot-product scaling
        module.log_score_scales.copy_(torch.tensor([[0.0, 1.0, -1.0, 0.5], [9.0, 9.0, 9.0, 9.0]]))
    features = [1e3 * torch.randn(2, 10, 6, dtype=torch.double), torch.randn(2, 5, 4, dtype=torch.double)]
    text_sum = 1e3 * torch.randn(2, config.text_config.hidden_size, dtype=torch.double)
    for weights, scales in zip(module.expert_attention(features, text_sum), ([1, math.e, 1 / math.e, math.e**0.5],
                                                                             [100.0] * 4)):
        logits = weights.log()
        spread = (logits.amax(-1) - logits.amin(-1)).max().item()
        assert 0 < spread <= 2 * sum(scales) + 1e-6
    assert module.log_score_scales.requires_grad


@pytest.mark.parametrize("scaling", ["pooled_inverse_dim", "cosine"])
def test_text_free_queries_ignore_the_prompt(scaling):
    model = tiny_model(cotr_text_conditioning=False, cotr_score_scaling=scaling)
    config = model.config
    pixels = random_pixels(config)
    first = model(input_ids=torch.tensor([image_prompt(config, text_after=(12, 13))]), pixel_values=pixels)
    second = model(input_ids=torch.tensor([image_prompt(config, text_after=(50, 60))]), pixel_values=pixels)
    torch.testing.assert_close(first.image_hidden_states, second.image_hidden_states, rtol=0, atol=0)


def test_mean_pooling_keeps_non_negative_cnn_features_from_collapsing():
    """ReLU-like features (all >= 0, like MobileNetV2's) make the summed pooled terms dominate: the documented
    reason for the `mean` default."""
    torch.manual_seed(0)
    token_scale = torch.rand(1, 196, 1) * 1.3 + 0.2  # object and background tokens differ in strength
    features = [torch.relu(torch.randn(1, 196, 1280) + 0.3) * token_scale]
    statistics = {}
    for pooling in ("sum", "mean"):
        config = tiny_config(num_visual_tokens=16, cotr_projection_dim=128, cotr_pooling=pooling)
        torch.manual_seed(1)
        module = ConditionalTokenReduction(config, [1280])
        alpha = module.expert_attention(features, torch.zeros(1, config.text_config.hidden_size))[0][0]
        statistics[pooling] = len(set(alpha.argmax(-1).tolist()))
    assert statistics["sum"] <= 3 and statistics["mean"] >= 8, statistics


# ---- the text-free ablation, the text-agnostic baselines -----------------------------------------------------------

def test_text_free_cotr_has_no_text_projections():
    config = tiny_config(cotr_text_conditioning=False)
    module = ConditionalTokenReduction(config, [12, 20], [9, 16])
    assert module.text_projections is None
    assert not any("text_projections" in name for name, _ in module.named_parameters())
    assert len(ConditionalTokenReduction(tiny_config(), [12, 20], [9, 16]).text_projections) == 2


@pytest.mark.parametrize("reduction, expected", [("cotr", ConditionalTokenReduction), ("avg_pool", AveragePooling),
                                                 ("none", FullTokens)])
def test_every_reducer_has_one_interface(reduction, expected):
    """(expert_features, text_sum) -> (n_images, num_image_tokens, Σ d_i), whatever the strategy."""
    config = tiny_config(token_reduction=reduction, full_token_grid=4)
    reducer = build_token_reducer(config, [32, 40], [16, 4])
    assert type(reducer) is expected
    features = [torch.randn(3, 16, 32), torch.randn(3, 4, 40)]
    output = reducer(features, torch.randn(3, config.text_config.hidden_size))
    assert output.shape == (3, config.num_image_tokens, 32 + 40)


def test_full_tokens_resample_each_expert_grid():
    config = tiny_config(token_reduction="none", full_token_grid=4)
    reducer = FullTokens(config, [32, 40], [16, 4])
    on_grid, coarse = torch.randn(1, 16, 32), torch.randn(1, 4, 40)
    output = reducer([on_grid, coarse], None)
    torch.testing.assert_close(output[..., :32], on_grid, rtol=0, atol=0)  # already 4x4: unchanged
    assert output[..., 32:].shape == (1, 16, 40)
    with pytest.raises(ValueError, match="yields 5 tokens, not a square grid"):
        reducer([torch.randn(1, 5, 32)], None)


def test_full_token_baseline_passes_every_token():
    model = tiny_model(token_reduction="none")
    config = model.config
    assert isinstance(model.model.token_reducer, FullTokens) and not list(model.model.token_reducer.parameters())
    assert config.num_image_tokens == 16  # the first expert's 4x4 grid; ConvNeXt's 2x2 is resampled to it
    output = model(input_ids=torch.tensor([image_prompt(config)]), pixel_values=random_pixels(config))
    assert output.image_hidden_states.shape == (1, 16, config.text_config.hidden_size)


def test_average_pooling_baseline():
    model = tiny_model(token_reduction="avg_pool", num_visual_tokens=4)
    config = model.config
    assert isinstance(model.model.token_reducer, AveragePooling) and config.num_image_tokens == 4
    assert not list(model.model.token_reducer.parameters())
    pixels = random_pixels(config)
    output = model(input_ids=torch.tensor([image_prompt(config)]), pixel_values=pixels)
    clip, convnext = (expert(pixels) for expert in model.model.vision_experts)
    clip_pooled = clip.reshape(1, 2, 2, 2, 2, 32).mean(dim=(2, 4)).reshape(1, 4, 32)  # 4x4 grid → 2x2 means
    expected = model.model.multi_modal_projector(torch.cat([clip_pooled, convnext], dim=-1))
    torch.testing.assert_close(output.image_hidden_states, expected)
    with pytest.raises(ValueError, match="square num_visual_tokens"):
        tiny_config(token_reduction="avg_pool", num_visual_tokens=5)


def test_the_model_returns_the_cotr_weights_that_made_its_visual_tokens():
    """`output_reduction_weights=True` (or the config option): per expert the softmax weights (n, N_V, N_i), rows
    summing to 1, that mix the expert's tokens into exactly the visual tokens the LLM received; None by default and
    for the fixed reducers, whose weights are not learned."""
    model = tiny_model()
    config = model.config
    pixels = random_pixels(config, num_images=2)
    inputs = {"input_ids": torch.tensor([image_prompt(config, num_images=2)]), "pixel_values": pixels}
    outputs = model(**inputs, output_reduction_weights=True)
    expert_features = [expert(pixels) for expert in model.vision_experts]
    weights = outputs.reduction_weights
    assert [tuple(w.shape) for w in weights] == [(2, config.num_visual_tokens, f.shape[1]) for f in expert_features]
    for alpha in weights:
        torch.testing.assert_close(alpha.sum(dim=-1), torch.ones(alpha.shape[:2]))
    mixed = torch.cat([alpha @ features for alpha, features in zip(weights, expert_features)], dim=-1)
    torch.testing.assert_close(model.multi_modal_projector(mixed), outputs.image_hidden_states)
    assert model(**inputs).reduction_weights is None
    model.config.output_reduction_weights = True
    try:
        torch.testing.assert_close(model(**inputs).reduction_weights, weights)
    finally:
        model.config.output_reduction_weights = False
    pooling = tiny_model(token_reduction="avg_pool", num_visual_tokens=4)
    pooled = pooling(input_ids=torch.tensor([image_prompt(pooling.config)]), pixel_values=random_pixels(pooling.config),
                     output_reduction_weights=True)
    assert pooled.reduction_weights is None and pooled.image_hidden_states is not None
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_reduction_weights=True)
    assert generated.tolist() == model.generate(**inputs, max_new_tokens=3, do_sample=False).tolist()


def test_an_elastic_batch_returns_each_images_weights_at_its_budget():
    """Images at budgets 1 and 4 in one prompt: image j's weights fill its first k_j rows (zeros after), and equal the
    weights of that image reduced alone at its budget."""
    model = tiny_model(cotr_budgets=[1, 2, 4], num_visual_tokens=4)
    config = model.config
    image = config.image_token_id
    pixels = random_pixels(config, num_images=2)
    outputs = model(input_ids=torch.tensor([[1, 10, image, 11, image, image, image, image, 12]]),
                    pixel_values=pixels, output_reduction_weights=True)
    for alpha in outputs.reduction_weights:
        assert alpha.shape[:2] == (2, 4) and alpha[0, 1:].abs().sum() == 0
        torch.testing.assert_close(alpha[:, :1].sum(dim=-1), torch.ones(2, 1))
    for j, budget in enumerate((1, 4)):  # the same prompt text (CoTR's condition), one image
        alone = model(input_ids=torch.tensor([[1, 10, *[image] * budget, 11, 12]]), pixel_values=pixels[j:j + 1],
                      output_reduction_weights=True).reduction_weights
        for mixed, single in zip(outputs.reduction_weights, alone):
            assert single.shape[1] == budget
            torch.testing.assert_close(mixed[j:j + 1, :budget], single)
