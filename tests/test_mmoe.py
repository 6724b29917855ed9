"""MMoE LoRA layers: the formula, routing, zero-init equivalence with the base LLM, the balance loss."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from conftest import tiny_config, tiny_model
from leo_mini_hf.modeling.mmoe import MMoELinear, MMoERouting, load_balancing_loss


def make_layer(batch=2, seq=5, **overrides):
    torch.manual_seed(0)
    config = tiny_config(**overrides)
    layer = MMoELinear(nn.Linear(12, 7), config, context_dim=6, name="layer")
    with torch.no_grad():
        layer.general_lora_B.normal_()
        layer.experts_lora_B.normal_()
    layer.routing = MMoERouting(torch.randn(batch, 6), None, config.mmoe_top_k)
    return layer, layer.routing, torch.randn(batch, seq, 12)


@pytest.mark.parametrize("weighting", ["softmax", "renormalized"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_mmoe_linear_matches_formula(weighting, top_k):
    layer, state, x = make_layer(mmoe_expert_weighting=weighting, mmoe_top_k=top_k)
    output = layer(x)
    probs = state.router_probs["layer"]
    expected = torch.empty_like(output)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            y = layer.weight @ token + layer.bias
            y = y + layer.scaling * layer.general_lora_B @ (layer.general_lora_A @ token)
            top = probs[b, t].topk(top_k)
            weights = top.values / top.values.sum() if weighting == "renormalized" else top.values
            for w, e in zip(weights, top.indices):
                y = y + w * layer.scaling * layer.experts_lora_B[e] @ (layer.experts_lora_A[e] @ token)
            expected[b, t] = y
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-5)


def test_per_sample_routing_gives_one_expert_per_sample():
    layer, state, x = make_layer(mmoe_router_uses_hidden_state=False, seq=9)
    layer(x)
    probs = state.router_probs["layer"]
    assert probs.shape == (2, 1, 3)


def test_per_token_routing_depends_on_hidden_state():
    layer, state, x = make_layer(seq=9)
    layer(x)
    probs = state.router_probs["layer"]
    assert probs.shape == (2, 9, 3)
    assert not torch.allclose(probs[:, 0], probs[:, 1])


def test_layer_without_context_raises():
    layer, state, x = make_layer()
    layer.routing = MMoERouting(torch.randn(5, 6), None, 1)
    with pytest.raises(ValueError, match="routing context"):
        layer(x)
    layer.routing = None
    with pytest.raises(ValueError, match="routing context"):
        layer(x)


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
    state = {f"model.{k}": v for k, v in model.model.language_model.state_dict().items() if parts[prefix + k] == "llm"}
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
    assert model(input_ids=torch.tensor([[1, 10, 11]])).aux_loss is None


def test_model_talks_to_mmoe_through_one_routing_per_forward():
    """Each forward hands every MMoE layer the same routing (its context in, all router probabilities out), and the
    model's aux_loss is that routing's balance loss."""
    model = tiny_model()
    outputs = model(input_ids=torch.tensor([[1, 10, 11, 12]]))
    routings = {id(layer.routing) for layer in model.model.mmoe.layers}
    assert len(routings) == 1 and len(model.model.mmoe.layers) == model.config.text_config.num_hidden_layers
    routing = model.model.mmoe.layers[0].routing
    torch.testing.assert_close(routing.context, outputs.routing_context)
    assert set(routing.router_probs) == {layer.layer_name for layer in model.model.mmoe.layers}
    torch.testing.assert_close(routing.balance_loss(), outputs.aux_loss)
