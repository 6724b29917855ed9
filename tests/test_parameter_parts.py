"""Which part of LEO-MINI each parameter belongs to is decided by module class, never by name: an LLM with `router`
modules of its own (here GraniteMoE) keeps them frozen in stage `finetune`, and a checkpoint that lacks them is refused."""

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from helpers.tiny_models import tiny_model
from helpers.tiny_parts import CLIP_VISION, tiny_moe_text_config, write_tiny_moe_llm, write_tiny_vision_model
from leo_mini_hf.conversion.llava import convert_llava_model
from leo_mini_hf.conversion.pretrained_parts import assemble_from_pretrained_parts
from leo_mini_hf.modeling.mmoe import MMoELinear, MMoERouter
from leo_mini_hf.modeling.modeling_leo_mini import PARAMETER_PARTS
from leo_mini_hf.training.stages import apply_training_stage


def test_every_parameter_has_one_part_by_module_class():
    model = tiny_model()
    parts = model.parameter_parts()
    assert set(dict(model.named_parameters())) <= set(parts) and set(parts.values()) == set(PARAMETER_PARTS)
    for name, module in model.named_modules():
        if isinstance(module, MMoELinear):
            assert parts[f"{name}.base_linear.weight"] == "llm"  # the frozen base linear is the LLM's
            assert parts[f"{name}.general_lora_A"] == "mmoe_general_lora"
            assert parts[f"{name}.experts_lora_B"] == "mmoe_routed_lora"
        if isinstance(module, MMoERouter):
            assert {parts[f"{name}.{p}"] for p, _ in module.named_parameters()} == {"mmoe_routers"}
    assert {parts[n] for n in parts if n.startswith("model.vision_experts.")} == {"vision_experts"}
    assert {parts[n] for n in parts if n.startswith("model.token_reducer.")} == {"token_reducer"}
    assert {parts[n] for n in parts if n.startswith("model.multi_modal_projector.")} == {"projector"}


@pytest.fixture(scope="module")
def moe_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {"llm": write_tiny_moe_llm(root / "llm"), "broken_llm": write_tiny_moe_llm(root / "broken", True),
            "clip": write_tiny_vision_model(root / "clip", CLIP_VISION)}


def test_finetune_keeps_the_llms_own_routers_frozen(moe_parts):
    model, _ = assemble_from_pretrained_parts(moe_parts["llm"], [moe_parts["clip"]], num_visual_tokens=4,
                                              mmoe_target_modules=["o_proj"])
    apply_training_stage(model, "finetune")
    llm_routers = [name for name, _ in model.named_parameters() if ".block_sparse_moe.router." in name]
    mmoe_routers = [name for name, _ in model.named_parameters() if ".o_proj.router." in name]
    assert llm_routers and mmoe_routers
    parameters = dict(model.named_parameters())
    assert not any(parameters[name].requires_grad for name in llm_routers)
    assert all(parameters[name].requires_grad for name in mmoe_routers)
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_building_from_an_llm_that_lacks_its_routers_is_refused(moe_parts):
    with pytest.raises(ValueError, match=r"The LLM in .* lacks weights .*block_sparse_moe\.router"):
        assemble_from_pretrained_parts(moe_parts["broken_llm"], [moe_parts["clip"]], num_visual_tokens=4,
                                       mmoe_target_modules=["o_proj"])


def test_converting_a_llava_that_lacks_its_llms_routers_is_refused(tmp_path):
    config = LlavaConfig(text_config=tiny_moe_text_config(), vision_config=CLIP_VISION, image_token_id=4,
                         vision_feature_layer=-2, vision_feature_select_strategy="default", image_seq_length=16)
    torch.manual_seed(3)
    llava = LlavaForConditionalGeneration(config).eval()
    assert convert_llava_model(llava, mmoe_target_modules=["o_proj"]).config.text_config.model_type == "granitemoe"
    llava.save_pretrained(tmp_path / "llava")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "llava" / "model.safetensors")
    save_file({k: v for k, v in state.items() if ".router." not in k}, tmp_path / "llava" / "model.safetensors",
              metadata={"format": "pt"})
    from leo_mini_hf.conversion.llava import convert_llava

    with pytest.raises(ValueError, match=r"The LLaVA model in .* lacks weights .*block_sparse_moe\.router"):
        convert_llava(tmp_path / "llava", tmp_path / "leo", mmoe_target_modules=["o_proj"])
