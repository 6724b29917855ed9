"""Quantized loading: LEO-MINI's own modules (CoTR, projector, whole MMoE layers: `trained_module_patterns`, declared as
`_keep_in_fp32_modules`) stay unquantized under every backend that runs on CPU (torchao, quanto, bitsandbytes), the
LLM's other linears are quantized, and the quantized LEO-MINI-Smol answers the bundled demo questions."""

import pytest
import torch

from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.modeling.modeling_leo_mini import trained_module_patterns

OWN_PARTS = {"token_reducer", "projector", "mmoe_general_lora", "mmoe_routed_lora", "mmoe_routers"}


def image_inputs(config, seed=0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.tensor([[1, 10, 11, *[config.image_token_id] * config.num_image_tokens, 12, 13]])
    return {"input_ids": input_ids,
            "pixel_values": torch.randn(1, 3, config.image_size, config.image_size, generator=generator)}


def test_patterns_name_cotr_the_projector_and_the_mmoe_targets_only(tiny_checkpoint):
    import re

    model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    patterns = trained_module_patterns(model.config)
    assert set(patterns) <= model._keep_in_fp32_modules

    def kept(name):  # as transformers' quantizers match: from the start, up to a module boundary
        return any(re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", name) for pattern in patterns)

    for name in ("model.token_reducer.queries", "model.multi_modal_projector.linear_1.weight",
                 "model.language_model.layers.3.mlp.down_proj.weight",
                 "model.language_model.layers.0.mlp.down_proj.router.out_proj.bias"):
        assert kept(name), name
    for name in ("model.language_model.layers.0.mlp.up_proj.weight", "model.language_model.layers.0.self_attn.q_proj"
                 ".weight", "model.vision_experts.0.model.encoder.layers.0.mlp.fc1.weight", "lm_head.weight"):
        assert not kept(name), name
    model.config.mmoe_target_modules = []  # no MMoE layers: nothing of the LLM is kept
    assert not any(re.match(p, "model.language_model.layers.0.mlp.up_proj.weight")
                   for p in trained_module_patterns(model.config))


def test_torchao_int8_quantizes_the_llm_linears_and_leaves_leo_minis_modules_alone(tiny_checkpoint):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    plain = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    quantized = LeoMiniForConditionalGeneration.from_pretrained(
        tiny_checkpoint, quantization_config=TorchAoConfig(Int8WeightOnlyConfig())).eval()
    parts = quantized.parameter_parts()
    parameters = dict(quantized.named_parameters())
    own = [name for name, part in parts.items() if part in OWN_PARTS or ".down_proj." in name]
    assert own and all(type(parameters[name].data) is torch.Tensor and parameters[name].dtype == torch.float32
                       for name in own)
    attention = [name for name in parameters if name.startswith("model.language_model.") and "_proj.weight" in name
                 and ".down_proj." not in name]
    assert attention and all(type(parameters[name].data) is not torch.Tensor for name in attention)
    inputs = image_inputs(plain.config)
    with torch.no_grad():
        expected, got = plain(**inputs).logits, quantized(**inputs).logits
    torch.testing.assert_close(got, expected, atol=0.05 * expected.abs().max().item(), rtol=0)
    assert quantized.generate(**inputs, max_new_tokens=4, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 4


def test_quanto_replaces_the_llm_linears_but_not_the_mmoe_layers(tiny_checkpoint):
    pytest.importorskip("optimum.quanto")
    from transformers import QuantoConfig

    from leo_mini_hf.modeling.mmoe import MMoELinear

    quantized = LeoMiniForConditionalGeneration.from_pretrained(
        tiny_checkpoint, quantization_config=QuantoConfig(weights="int8")).eval()
    layer = quantized.model.language_model.layers[0]
    assert type(layer.mlp.down_proj) is MMoELinear and type(layer.self_attn.q_proj).__name__ == "QLinear"
    assert type(quantized.model.multi_modal_projector.linear_1) is torch.nn.Linear
    reference = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert torch.equal(layer.mlp.down_proj.experts_lora_B,
                       reference.model.language_model.layers[0].mlp.down_proj.experts_lora_B)  # adapters loaded
    inputs = image_inputs(quantized.config)
    assert quantized.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchao-int8", "quanto-int8", "bnb-int8", "bnb-nf4"])
def test_quantized_leo_mini_smol_answers_the_bundled_questions(backend):
    from leo_mini_hf.demo import bundled_chat_samples, demo_checkpoint
    from leo_mini_hf.easyvqa.evaluation import answer_questions, normalise_answer

    pytest.importorskip({"torchao-int8": "torchao", "quanto-int8": "optimum.quanto"}.get(backend, "bitsandbytes"))
    from transformers import BitsAndBytesConfig, QuantoConfig, TorchAoConfig

    def config():
        if backend == "torchao-int8":
            from torchao.quantization import Int8WeightOnlyConfig

            return TorchAoConfig(Int8WeightOnlyConfig())
        if backend == "quanto-int8":
            return QuantoConfig(weights="int8")
        return BitsAndBytesConfig(load_in_8bit=True) if backend == "bnb-int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4")

    folder = demo_checkpoint()
    model = LeoMiniForConditionalGeneration.from_pretrained(folder, quantization_config=config(),
                                                            device_map="cpu").eval()
    processor = LeoMiniProcessor.from_pretrained(folder)
    samples = bundled_chat_samples()
    answers = [normalise_answer(answer) for answer in answer_questions(model, processor, samples, batch_size=6)]
    assert answers == [sample["answer"] for sample in samples]
    assert model.model.token_reducer.queries.dtype == torch.float32
