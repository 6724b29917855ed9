"""Slow: conversions checked on the real pretrained weights that install offline (see ../shared ASSETS).

Skipped when the weight packages are not installed; `make test` installs them (`--no-deps`).
"""

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD

from helpers.mobilenet_reference import reference_forward
from leo_mini_hf.conversion.mobilenet_v2 import convert_mobilenet_v2
from leo_mini_hf.conversion.smol import installed_asset

try:
    MOBILENET_WEIGHTS = installed_asset("mobilenet_v2")
    SMOL_GGUF = installed_asset("llm")
except FileNotFoundError as missing:
    pytest.skip(f"real weights not installed: {missing}", allow_module_level=True)

skimage_data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.slow
EGYPTIAN_CAT, ESPRESSO = 285, 967


def imagenet_pixels(array: np.ndarray) -> torch.Tensor:
    """Resize the short side to 256, centre-crop 224, normalise: the standard ImageNet evaluation transform."""
    image = Image.fromarray(array)
    scale = 256 / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    pixels = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None]


def test_real_mobilenet_v2_conversion_matches_reference(tmp_path):
    from transformers import MobileNetV2ForImageClassification

    folder = convert_mobilenet_v2(MOBILENET_WEIGHTS, tmp_path / "mobilenet")
    model = MobileNetV2ForImageClassification.from_pretrained(folder).eval()
    state_dict = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    for name, label in (("chelsea", EGYPTIAN_CAT), ("coffee", ESPRESSO)):
        pixels = imagenet_pixels(getattr(skimage_data, name)())
        with torch.no_grad():
            features, logits = reference_forward(state_dict, pixels)
            converted_features = model.mobilenet_v2(pixels).last_hidden_state
            converted_logits = model(pixels).logits
        assert logits.argmax().item() == converted_logits.argmax().item() == label, name
        torch.testing.assert_close(converted_features, features, rtol=0, atol=1e-4)


def test_leo_mini_smol_builds_and_answers_text(tmp_path, capsys):
    from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
    from leo_mini_hf.cli import main as cli

    out = tmp_path / "leo-mini-smol"
    started = time.perf_counter()
    cli(["build", "--preset", "leo-mini-smol", "--out", str(out)])
    build_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model = LeoMiniForConditionalGeneration.from_pretrained(out).eval()
    processor = LeoMiniProcessor.from_pretrained(out)
    load_seconds = time.perf_counter() - started
    total = sum(p.numel() for p in model.parameters())
    parts = model.parameter_parts()
    llm = sum(p.numel() for n, p in model.named_parameters() if parts[n] == "llm")
    with capsys.disabled():
        print(f"\nleo-mini-smol: build {build_seconds:.1f} s, load {load_seconds:.2f} s, {total:,} parameters "
              f"({llm:,} LLM, {sum(p.numel() for p in model.model.vision_experts.parameters()):,} vision)")
    assert model.model.vision_experts[0].num_tokens == 196 and model.config.num_image_tokens == 16
    chat = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    answer = processor.batch_decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)
                                    [:, inputs["input_ids"].shape[1]:])[0]
    assert "Paris" in answer
    image = Image.fromarray(skimage_data.chelsea())
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 448, 448)
    assert model.generate(**inputs, max_new_tokens=4).shape[1] == inputs["input_ids"].shape[1] + 4

    # the `leo-mini-smol` preset describes exactly the model the build assembles from the parts
    from leo_mini_hf import preset_config

    with torch.device("meta"):
        from_preset = LeoMiniForConditionalGeneration(preset_config("leo-mini-smol"))
    assert {name: tensor.shape for name, tensor in from_preset.state_dict().items()} == {
        name: tensor.shape for name, tensor in model.state_dict().items()}
    preset, built = preset_config("leo-mini-smol").to_dict(), model.config.to_dict()
    for name in ("text_config", "vision_experts", "_name_or_path", "transformers_version", "architectures",
                 "auto_map", "dtype"):
        preset.pop(name, None), built.pop(name, None)
    assert preset == built
    assert from_preset.vision_experts[0].model.config.to_dict() == model.vision_experts[0].model.config.to_dict()


def test_readme_main_job_leo_mini_demo(tmp_path, monkeypatch, capsys):
    """`leo-mini demo`: assemble LEO-MINI-Smol offline from the installed parts + shipped weights, run the
    pipeline on the bundled easy-vqa questions."""
    from leo_mini_hf.cli import main as cli
    from leo_mini_hf.demo import DEMO_WEIGHTS

    if not DEMO_WEIGHTS.is_file():
        pytest.skip("no shipped demo weights in this checkout")
    monkeypatch.setenv("LEO_MINI_CACHE", str(tmp_path))
    cli(["demo"])
    printed = capsys.readouterr().out
    assert "196 from the expert -> 16 after CoTR" in printed
    correct = int(printed.split(" bundled questions answered correctly")[0].rsplit("\n", 1)[-1].split("/")[0])
    with capsys.disabled():
        print(f"\nleo-mini demo: {correct}/6 bundled questions right")
    assert correct >= 5
    cli(["demo", "--image", str(Path(DEMO_WEIGHTS).parent / "demo" / "easyvqa_test_396.png"), "--question",
         "what shape is present?"])
    assert "-> circle" in capsys.readouterr().out
    # the README's batched generate on the demo checkpoint: left padding is saved with it, so a batch answers each
    # question as a single call does (with right padding SmolLM2 answered "rectanglerectangle..." in a batch)
    import json

    from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
    from leo_mini_hf.demo import bundled_questions, question_chat

    folder = tmp_path / "leo-mini-smol-easyvqa"
    assert json.loads((folder / "tokenizer_config.json").read_text())["padding_side"] == "left"
    model = LeoMiniForConditionalGeneration.from_pretrained(folder).eval()
    processor = LeoMiniProcessor.from_pretrained(folder)
    chats = [question_chat(item) for item in bundled_questions()]

    def answers(conversations):
        inputs = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        return processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    assert answers(chats) == [answers([chat])[0] for chat in chats]
