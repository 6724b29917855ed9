"""Converters and builders on tiny synthetic inputs: GGUF, torchvision MobileNetV2, pretrained parts, LLaVA."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, MobileNetV2Config, MobileNetV2ForImageClassification

from helpers.tiny_models import random_pixels
from helpers.mobilenet_reference import reference_forward, to_torchvision_state_dict
from helpers.tiny_parts import (CLIP_VISION, MOBILENET, tiny_llava, write_tiny_gguf, write_tiny_llm,
                                write_tiny_vision_model)
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.cli import main as cli
from leo_mini_hf.conversion.gguf_llm import convert_gguf_llm
from leo_mini_hf.conversion.llava import convert_llava_model
from leo_mini_hf.conversion.mobilenet_v2 import convert_mobilenet_v2, convert_state_dict, torchvision_to_transformers_key
from leo_mini_hf.conversion.pretrained_parts import build_from_pretrained_parts


# ---- GGUF -------------------------------------------------------------------------------------------------------

def test_gguf_converts_to_plain_safetensors(tmp_path):
    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf_llm(gguf_path, tmp_path / "llm")
    assert (out / "model.safetensors").exists() and not list(out.glob("*.gguf"))
    converted = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(converted.config, "quantization_config", None) is None
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    ids = AutoTokenizer.from_pretrained(out)("hello world", return_tensors="pt").input_ids
    assert ids[0].tolist() == AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")("hello world").input_ids
    torch.testing.assert_close(converted(ids).logits, direct(ids).logits, rtol=0, atol=0)


def test_gguf_missing_file_raises(tmp_path):
    with pytest.raises(ValueError, match="GGUF file not found"):
        convert_gguf_llm(tmp_path / "absent.gguf", tmp_path / "out")


# ---- torchvision MobileNetV2 -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_mobilenet():
    torch.manual_seed(0)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=0.35, tf_padding=False,
                                                                layer_norm_eps=1e-5, num_labels=10)).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics, so the test sees them
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
    return model


def test_key_mapping_round_trips(small_mobilenet):
    torchvision_state = to_torchvision_state_dict(small_mobilenet)
    assert len(torchvision_state) == len(small_mobilenet.state_dict())
    config, converted = convert_state_dict(torchvision_state)
    assert config.depth_multiplier == 0.35 and config.num_labels == 10
    for key, tensor in small_mobilenet.state_dict().items():
        assert torch.equal(converted[key], tensor), key


def test_converted_features_match_pure_torch_reference(small_mobilenet, tmp_path):
    torchvision_state = to_torchvision_state_dict(small_mobilenet)
    torch.save(torchvision_state, tmp_path / "weights.pth")
    folder = convert_mobilenet_v2(tmp_path / "weights.pth", tmp_path / "mobilenet")
    converted = MobileNetV2ForImageClassification.from_pretrained(folder).eval()
    pixels = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        features, logits = reference_forward(torchvision_state, pixels)
        torch.testing.assert_close(converted.mobilenet_v2(pixels).last_hidden_state, features, rtol=0, atol=1e-4)
        torch.testing.assert_close(converted(pixels).logits, logits, rtol=0, atol=1e-4)


def test_unknown_torchvision_key_raises():
    with pytest.raises(ValueError, match="Not a torchvision MobileNetV2 key"):
        torchvision_to_transformers_key("backbone.conv1.weight")
    with pytest.raises(ValueError, match="Unexpected MobileNetV2 block"):
        torchvision_to_transformers_key("features.19.conv.0.0.weight")


# ---- build from pretrained parts ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return {
        "llm": write_tiny_llm(root / "llm"),
        "clip": write_tiny_vision_model(root / "clip", CLIP_VISION),
        "mobilenet": write_tiny_vision_model(root / "mobilenet", MOBILENET),
        "gguf_llm": convert_gguf_llm(write_tiny_gguf(root / "tiny.gguf"), root / "gguf_llm"),
    }


def test_build_loads_pretrained_parts_exactly(parts, tmp_path):
    out = tmp_path / "leo"
    cli(["build", "--llm", str(parts["llm"]), "--vision-expert", str(parts["clip"]), "--vision-expert",
         str(parts["mobilenet"]), "--out", str(out), "--set", "num_visual_tokens=4", "--set", "mmoe_rank=2"])
    model = LeoMiniForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.num_visual_tokens == 4 and model.config.mmoe_rank == 2
    llm = AutoModelForCausalLM.from_pretrained(parts["llm"]).eval()
    llm_state = llm.state_dict()
    for key, tensor in model.model.language_model.state_dict().items():
        if "lora" not in key and "router" not in key:
            assert torch.equal(tensor, llm_state[f"model.{key}".replace(".base_linear.", ".")]), key
    clip_state = load_file(parts["clip"] / "model.safetensors")
    for key, tensor in clip_state.items():
        assert torch.equal(model.model.vision_experts[0].model.state_dict()[key], tensor), key
    assert model.model.vision_experts[0].feature_layer == -2 and model.model.vision_experts[0].num_prefix_tokens == 1

    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(input_ids=ids).logits, rtol=0, atol=0)
    processor = LeoMiniProcessor.from_pretrained(out)
    inputs = processor(images=random_pixels(model.config).clamp(0, 1)[0], text="<image> what?", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3


def test_build_adds_the_image_token_and_keeps_text_behaviour(parts, tmp_path):
    out = build_from_pretrained_parts(parts["gguf_llm"], [parts["mobilenet"]], tmp_path / "leo", num_visual_tokens=2)
    model = LeoMiniForConditionalGeneration.from_pretrained(out).eval()
    llm = AutoModelForCausalLM.from_pretrained(parts["gguf_llm"]).eval()
    assert model.config.text_config.vocab_size == llm.config.vocab_size + 1 == model.config.image_token_id + 1
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits[..., : llm.config.vocab_size], llm(input_ids=ids).logits, rtol=0, atol=0)
    assert model.generation_config.suppress_tokens == [model.config.image_token_id]
    expected = llm.generate(ids, max_new_tokens=6, do_sample=False)
    assert model.generate(input_ids=ids, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


def test_build_refuses_to_overwrite(parts, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        cli(["build", "--llm", str(parts["llm"]), "--vision-expert", str(parts["clip"]), "--out", str(out)])
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_failed_build_leaves_no_folder(parts, tmp_path):
    with pytest.raises(SystemExit):
        cli(["build", "--llm", str(parts["llm"]), "--vision-expert", str(parts["clip"]), "--out",
             str(tmp_path / "leo"), "--set", "token_reduction=bogus"])
    assert list(tmp_path.iterdir()) == []


# ---- LLaVA --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("feature_layer, projector_bias", [(-2, True), (-1, False)])
def test_converted_llava_computes_llava_logits(feature_layer, projector_bias):
    llava = tiny_llava(feature_layer, "default", projector_bias)
    leo = convert_llava_model(llava).eval()
    assert leo.config.token_reduction == "none" and leo.config.num_image_tokens == 16
    ids = torch.tensor([[1, 10, 11] + [4] * 16 + [12, 13], [1, 20, 21] + [4] * 16 + [22, 23]])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = llava(input_ids=ids, pixel_values=pixels).logits
        actual = leo(input_ids=ids, pixel_values=pixels).logits
    assert (expected - actual).abs().max() < 1e-4


def test_llava_with_unsupported_layout_raises():
    with pytest.raises(ValueError, match="vision_feature_select_strategy='default'"):
        convert_llava_model(tiny_llava(strategy="full"))
    with pytest.raises(ValueError, match="several vision feature layers"):
        convert_llava_model(tiny_llava(feature_layer=[-2, -1]))


def test_llava_with_cotr_is_a_training_start(tmp_path):
    llava = tiny_llava()
    llava.save_pretrained(tmp_path / "llava")
    from leo_mini_hf.conversion.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(tmp_path / "llava")
    cli(["convert", "llava", "--src", str(tmp_path / "llava"), "--out", str(tmp_path / "leo"), "--token-reduction",
         "cotr", "--set", "num_visual_tokens=4"])
    leo = LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "leo").eval()
    assert leo.config.num_image_tokens == 4 and leo.model.token_reducer is not None
    processor = LeoMiniProcessor.from_pretrained(tmp_path / "leo")
    assert processor.num_image_tokens == 4 and processor.image_token == "<image>"
    inputs = processor(images=torch.rand(3, 40, 40), text="<image> hi", return_tensors="pt")
    assert torch.isfinite(leo(**inputs).logits).all()
    # an MMoE layer holds the LLM's linear as its base_linear
    leo_state = {key.replace(".base_linear.", "."): tensor for key, tensor in leo.model.language_model.state_dict().items()}
    for key, tensor in llava.model.language_model.state_dict().items():
        assert torch.equal(leo_state[key], tensor), key


# ---- bad input at the command line: refused with one line, nothing written ------------------------------------------

@pytest.mark.parametrize("setting, match", [
    ("num_visual_token=16", "'num_visual_token' is not a LeoMiniConfig option; did you mean 'num_visual_tokens'"),
    ("num_visual_tokens=true", "`num_visual_tokens` must be of type int, got bool"),
    ("image_size=0", "`image_size` must be positive"),
])
def test_build_refuses_unknown_or_invalid_options(tmp_path, capsys, setting, match):
    with pytest.raises(SystemExit):
        cli(["build", "--preset", "tiny", "--random-init", "--out", str(tmp_path / "out"), "--set", setting])
    error = capsys.readouterr().err
    assert match in error and "Traceback" not in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, match", [
    (["convert", "llava", "--src", "/no/such/llava"], "The LLaVA model folder not found: /no/such/llava"),
    (["convert", "gguf", "--src", "/no/such/model.gguf"], "GGUF file not found"),
    (["build", "--llm", "/no/such/llm", "--vision-expert", "/no/such/clip"], "The LLM folder not found"),
])
def test_missing_sources_are_named(tmp_path, capsys, command, match):
    with pytest.raises(SystemExit):
        cli([*command, "--out", str(tmp_path / "out")])
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_converting_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(SystemExit):
        cli(["convert", "mobilenet-v2", "--src", str(tmp_path / "notes.pth"), "--out", str(tmp_path / "out")])
    assert "is not a PyTorch weights file" in capsys.readouterr().err


def test_an_unwritable_target_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SystemExit):
        cli(["build", "--preset", "tiny", "--random-init", "--out", str(tmp_path / "a-file" / "out")])
    error = capsys.readouterr().err
    assert error.startswith("leo-mini build: ") and error.count("\n") == 1


def test_a_built_checkpoint_pads_on_the_left_and_batched_generation_equals_single_calls(parts, tmp_path):
    """An LLM whose tokenizer has no padding side of its own (a GGUF conversion, as SmolLM2's): the built checkpoint
    saves `padding_side="left"`, so the README's batched `generate` answers each prompt as a single call does."""
    import json

    out = build_from_pretrained_parts(parts["gguf_llm"], [parts["mobilenet"]], tmp_path / "leo", num_visual_tokens=2)
    assert json.loads((out / "tokenizer_config.json").read_text())["padding_side"] == "left"
    model = LeoMiniForConditionalGeneration.from_pretrained(out).eval()
    processor = LeoMiniProcessor.from_pretrained(out)
    images = [random_pixels(model.config, seed=seed).clamp(0, 1)[0] for seed in (0, 1)]
    prompts = ["<image> what shape is this, please?", "<image> colour?"]
    batch = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left
    with torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, (image, prompt) in enumerate(zip(images, prompts)):
            single = processor(images=image, text=prompt, return_tensors="pt")
            alone = model.generate(**single, max_new_tokens=4, do_sample=False)[:, single["input_ids"].shape[1]:]
            assert batched[row].tolist() == alone[0].tolist()
