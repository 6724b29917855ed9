"""MMoE LoRA layers: the formula, routing, zero-init equivalence with the base LLM, the balance loss."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from helpers.tiny_models import image_prompt, random_pixels, tiny_config, tiny_model
from leo_mini_hf.modeling.mmoe import MMoELinear, MMoERouterContext, MMoERouting, load_balancing_loss

ROUTER_LAYOUTS = [{}, {"mmoe_router_token_input": "hidden_state", "mmoe_router_context": "per_layer"}]
LAYOUT_IDS = ["default", "per-layer-hidden-state"]


def make_layer(batch=2, seq=5, **overrides):
    """One MMoE layer (12 → 7, context width 6), random LoRA B, its routing on a random context (projected by a
    `MMoERouterContext` when the config shares it), and an input (batch, seq, 12)."""
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    layer = MMoELinear(nn.Linear(12, 7), config, context_dim=6, name="layer")
    with torch.no_grad():
        layer.general_lora_B.normal_()
        layer.experts_lora_B.normal_()
    context = torch.randn(batch, 6)
    if config.mmoe_router_context == "shared":
        context = MMoERouterContext(6, config.mmoe_router_hidden_size)(context)
    return layer, MMoERouting(context), torch.randn(batch, seq, 12)


def routed(layer, routing, x):
    """The layer's output on x with `routing` active, as inside a LEO-MINI forward."""
    with routing.active():
        return layer(x)


@pytest.mark.parametrize("layout", ROUTER_LAYOUTS, ids=LAYOUT_IDS)
def test_router_logits_match_the_literal_mlp(layout):
    """logits = W_out gelu(c + W_tok t) + b_out per token: c the context's projection (the shared one, computed
    before the layer, or the router's own), t the general LoRA's A_g x (default) or x itself."""
    layer, state, x = make_layer(**layout)
    routed(layer, state, x)
    router = layer.router
    for b in range(x.shape[0]):
        context = state.context[b]
        if router.context_proj is not None:
            context = router.context_proj.weight @ context + router.context_proj.bias
        for t in range(x.shape[1]):
            token = x[b, t] if layout else layer.general_lora_A @ x[b, t]
            hidden = torch.nn.functional.gelu(context + router.hidden_proj.weight @ token)
            expected = router.out_proj.weight @ hidden + router.out_proj.bias
            torch.testing.assert_close(state.router_logits["layer"][b, t], expected, rtol=1e-5, atol=1e-6)


def test_default_routers_are_small_beside_the_lora():
    """The default router reads A_g x (rank 4 here) and a context projected once for all layers: per layer it holds
    hidden × (rank + 1) + (hidden + 1) × experts parameters, nothing that grows with the layer's width."""
    layer, _, _ = make_layer()
    per_layer = {name: tuple(p.shape) for name, p in layer.router.named_parameters()}
    assert per_layer == {"hidden_proj.weight": (16, 4), "out_proj.weight": (3, 16), "out_proj.bias": (3,)}
    legacy, _, _ = make_layer(**ROUTER_LAYOUTS[1])
    assert {name: tuple(p.shape) for name, p in legacy.router.named_parameters()} == {
        "context_proj.weight": (16, 6), "context_proj.bias": (16,), "hidden_proj.weight": (16, 12),
        "out_proj.weight": (3, 16), "out_proj.bias": (3,)}


@pytest.mark.parametrize("layout", ROUTER_LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("weighting", ["softmax", "renormalized"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_mmoe_linear_matches_formula(weighting, top_k, layout):
    layer, state, x = make_layer(mmoe_expert_weighting=weighting, mmoe_top_k=top_k, **layout)
    output = routed(layer, state, x)
    probs = state.router_logits["layer"].softmax(-1)
    expected = torch.empty_like(output)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            y = layer.base_linear.weight @ token + layer.base_linear.bias
            y = y + layer.scaling * layer.general_lora_B @ (layer.general_lora_A @ token)
            top = probs[b, t].topk(top_k)
            weights = top.values / top.values.sum() if weighting == "renormalized" else top.values
            for w, e in zip(weights, top.indices):
                y = y + w * layer.scaling * layer.experts_lora_B[e] @ (layer.experts_lora_A[e] @ token)
            expected[b, t] = y
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_per_sample_routing_gives_one_expert_per_sample():
    layer, state, x = make_layer(mmoe_router_uses_hidden_state=False, seq=9)
    routed(layer, state, x)
    probs = state.router_logits["layer"].softmax(-1)
    assert probs.shape == (2, 1, 3)


def test_per_token_routing_depends_on_hidden_state():
    layer, state, x = make_layer(seq=9)
    routed(layer, state, x)
    probs = state.router_logits["layer"].softmax(-1)
    assert probs.shape == (2, 9, 3)
    assert not torch.allclose(probs[:, 0], probs[:, 1])


def test_layer_without_context_raises():
    layer, state, x = make_layer()
    with pytest.raises(ValueError, match="routing context"):
        routed(layer, MMoERouting(torch.randn(5, 16)), x)
    with pytest.raises(ValueError, match="routing context"):
        layer(x)  # no routing active
    routed(layer, state, x)
    with pytest.raises(ValueError, match="routing context"):
        layer(x)  # the routing is active only inside its block


def test_balance_loss_values_and_gradient():
    uniform = torch.full((2, 4, 3), 1 / 3)
    assert load_balancing_loss([uniform], top_k=1, token_mask=None).item() == pytest.approx(1.0)
    collapsed = torch.tensor([0.98, 0.01, 0.01]).expand(2, 4, 3)
    assert load_balancing_loss([collapsed], top_k=1, token_mask=None).item() == pytest.approx(3 * 0.98)

    logits = torch.randn(2, 4, 3, requires_grad=True)
    load_balancing_loss([logits.softmax(-1)], top_k=1, token_mask=None).backward()
    assert logits.grad.abs().sum() > 0


def test_balance_loss_ignores_padding():
    probs = torch.tensor([[[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]]])
    padded = torch.cat([probs, torch.tensor([[[0.05, 0.05, 0.9]]]).expand(1, 1, 3)], dim=1)
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(load_balancing_loss([padded], 1, mask), load_balancing_loss([probs], 1, None))


def test_fresh_model_equals_its_base_llm():
    model = tiny_model(randomize_lora=False)
    config = model.config
    base = AutoModelForCausalLM.from_config(config.text_config).eval()
    parts = model.parameter_parts()
    prefix = "model.language_model."
    state = {f"model.{k}".replace(".base_linear.", "."): v  # an MMoE layer holds the LLM's linear as its base_linear
             for k, v in model.model.language_model.state_dict().items() if parts[prefix + k] == "llm"}
    state["lm_head.weight"] = model.lm_head.weight
    base.load_state_dict(state, strict=True)
    input_ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    torch.testing.assert_close(model(input_ids=input_ids).logits, base(input_ids=input_ids).logits,
                               rtol=0, atol=1e-6)


def test_trained_lora_changes_logits():
    input_ids = torch.tensor([[1, 10, 20, 30, 40, 50]])
    fresh = tiny_model(randomize_lora=False)(input_ids=input_ids).logits
    trained = tiny_model(randomize_lora=True)(input_ids=input_ids).logits
    assert not torch.allclose(fresh, trained)


def test_mmoe_targets_every_decoder_layer():
    model = tiny_model()
    layers = [m for m in model.modules() if isinstance(m, MMoELinear)]
    assert len(layers) == model.config.text_config.num_hidden_layers
    assert all(layer.layer_name.endswith("mlp.down_proj") for layer in layers)
    two_targets = tiny_model(mmoe_target_modules=["down_proj", "up_proj"])
    assert sum(isinstance(m, MMoELinear) for m in two_targets.modules()) == 2 * len(layers)


def test_unknown_target_module_raises():
    with pytest.raises(ValueError, match="match no nn.Linear"):
        tiny_model(mmoe_target_modules=["no_such_proj"])


def test_general_lora_only_ablation_has_no_router_and_no_aux_loss():
    model = tiny_model(mmoe_num_experts=0)
    assert "mmoe_routers" not in set(model.parameter_parts().values())
    outputs = model(input_ids=torch.tensor([[1, 10, 11]]), labels=torch.tensor([[1, 10, 11]]),
                    output_router_logits=True)
    assert outputs.aux_loss is None and outputs.router_logits is None


def test_the_model_returns_every_layers_router_logits_and_the_balance_loss_is_a_function_of_them():
    """As Mixtral: `output_router_logits=True` returns one (B, T, E) tensor per MMoE layer, in the LLM's order, and
    aux_loss is `load_balancing_loss` of them; no MMoE layer keeps any state of the call."""
    model = tiny_model()
    input_ids = torch.tensor([[1, 10, 11, 12], [1, 13, 14, 15]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    outputs = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    layers = model.mmoe.layers
    assert len(outputs.router_logits) == len(layers) == model.config.text_config.num_hidden_layers
    assert all(logits.shape == (2, 4, model.config.mmoe_num_experts) for logits in outputs.router_logits)
    expected = load_balancing_loss([logits.softmax(-1) for logits in outputs.router_logits], model.config.mmoe_top_k,
                                   attention_mask)
    torch.testing.assert_close(outputs.aux_loss, expected)
    assert not any(hasattr(layer, "routing") for layer in layers)
    plain = model(input_ids=input_ids, attention_mask=attention_mask)
    assert plain.router_logits is None and plain.aux_loss is None  # decoding does no training-only work
    torch.testing.assert_close(plain.logits, outputs.logits)
    with_labels = model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)
    torch.testing.assert_close(with_labels.aux_loss, expected)


def test_a_forward_interrupted_by_another_on_the_same_model_keeps_its_own_routing():
    """Thread A pauses before the LLM's last layer while thread B runs a whole forward on the same model: A's logits
    must equal its uninterrupted ones (when routing lived on the shared layers, B's overwrote A's mid-forward)."""
    import threading

    model = tiny_model()
    config = model.config
    inputs_a = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config, seed=1)}
    inputs_b = {"input_ids": torch.tensor([image_prompt(config, text_before=(20, 21))]),
                "pixel_values": random_pixels(config, seed=2)}
    with torch.no_grad():
        alone = model(**inputs_a).logits
    a_paused, b_done = threading.Event(), threading.Event()

    def pause_a(module, args):
        if threading.current_thread().name == "A" and not a_paused.is_set():
            a_paused.set()
            assert b_done.wait(timeout=60)

    hook = model.language_model.layers[-1].register_forward_pre_hook(pause_a)
    results = {}

    def run_a():
        with torch.no_grad():
            results["a"] = model(**inputs_a).logits

    thread_a = threading.Thread(target=run_a, name="A")
    try:
        thread_a.start()
        assert a_paused.wait(timeout=60)
        with torch.no_grad():
            model(**inputs_b)
        b_done.set()
        thread_a.join(timeout=60)
    finally:
        hook.remove()
    torch.testing.assert_close(results["a"], alone, rtol=0, atol=0)


def test_threads_generating_at_once_on_one_model_give_the_one_at_a_time_answers():
    """4 threads, 5 generations each, on one model with non-zero adapters: every answer equals its one-at-a-time
    answer (the routing travels with each call)."""
    from concurrent.futures import ThreadPoolExecutor

    model = tiny_model()
    config = model.config
    prompts = [{"input_ids": torch.tensor([image_prompt(config, text_before=(10 + i, 11))]),
                "pixel_values": random_pixels(config, seed=i)} for i in range(4)]

    def answer(inputs):
        with torch.inference_mode():
            return model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist()

    alone = [answer(inputs) for inputs in prompts]
    assert len({str(a) for a in alone}) > 1  # the prompts route differently, or the test could not fail
    with ThreadPoolExecutor(max_workers=4) as pool:
        together = list(pool.map(answer, prompts * 5))
    assert together == alone * 5
