"""A checkpoint folder is usable with transformers alone: remote code, AutoProcessor, pipeline."""

import json

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from helpers.without_package import CHAT, make_image, run_without_package
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.hub.checkpoint_folder import AUTO_MAP, remote_code_files


@pytest.fixture(scope="module")
def local_model(tiny_checkpoint):
    return LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()


def local_generate(model, processor, images, prompts, max_new_tokens=6):
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def test_folder_holds_remote_code_and_auto_map(tiny_checkpoint):
    names = {path.name for path in tiny_checkpoint.iterdir()}
    assert {p.name for p in remote_code_files()} <= names
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "chat_template.jinja",
            "generation_config.json"} <= names
    assert json.loads((tiny_checkpoint / "config.json").read_text())["auto_map"] == AUTO_MAP
    processor_config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_leo_mini.LeoMiniProcessor"
    for path in remote_code_files():  # flat-copy rule: sibling imports only
        source = path.read_text()
        assert "leo_mini_hf" not in source and "from .." not in source and "from . import" not in source, path.name
        assert "isinstance(config" not in source, path.name


@pytest.mark.slow
def test_remote_code_generate_matches_package(tiny_checkpoint, local_model, tiny_processor):
    prompt = tiny_processor.apply_chat_template(CHAT, add_generation_prompt=True)
    expected = local_generate(local_model, tiny_processor, [make_image(0)], [prompt])
    remote = run_without_package(tiny_checkpoint, """
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        prompt = processor.apply_chat_template(CHAT, add_generation_prompt=True)
        inputs = processor(images=[make_image(0)], text=[prompt], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        print(json.dumps({"tokens": out[:, inputs["input_ids"].shape[1]:].tolist(),
                          "classes": [type(processor).__name__, type(model).__name__]}))
    """)
    assert remote["classes"] == ["LeoMiniProcessor", "LeoMiniForConditionalGeneration"]
    assert remote["tokens"] == expected


@pytest.mark.slow
def test_remote_code_pipeline_chat_and_batched_plain_mode(tiny_checkpoint, local_model, tiny_processor):
    chat_prompt = tiny_processor.apply_chat_template(CHAT, add_generation_prompt=True)
    expected_chat = tiny_processor.decode(local_generate(local_model, tiny_processor, [make_image(1)], [chat_prompt])[0])
    plain = ["<image>What colour?", "<image>What shape is in the picture?"]
    expected_plain = [
        tiny_processor.decode(local_generate(local_model, tiny_processor, [make_image(2 + i)], [text])[0])
        for i, text in enumerate(plain)
    ]
    remote = run_without_package(tiny_checkpoint, """
        pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
        chat = [{"role": "user", "content": [{"type": "image", "image": make_image(1)},
                                             {"type": "text", "text": "What colour is the shape?"}]}]
        chat_out = pipe(text=chat, max_new_tokens=6, generate_kwargs={"do_sample": False}, return_full_text=False)
        plain_out = pipe(images=[make_image(2), make_image(3)], text=["<image>What colour?",
                         "<image>What shape is in the picture?"], max_new_tokens=6, generate_kwargs={"do_sample": False},
                         batch_size=2,
                         return_full_text=False)
        print(json.dumps({"chat": chat_out[0]["generated_text"], "plain": [o["generated_text"] for o in plain_out]}))
    """)
    assert remote["chat"] == expected_chat
    assert remote["plain"] == expected_plain


def test_package_installed_needs_no_trust_remote_code(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    assert type(processor) is LeoMiniProcessor and type(model) is LeoMiniForConditionalGeneration
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint))
    out = pipe(text=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_new_tokens=3)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def test_text_only_prompt_end_to_end(tiny_checkpoint, local_model, tiny_processor):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint))
    out = pipe(text="Tell me something", max_new_tokens=4, generate_kwargs={"do_sample": False},
               return_full_text=False)
    expected = tiny_processor.decode(local_generate(local_model, tiny_processor, None, ["Tell me something"], 4)[0])
    assert out[0]["generated_text"] == expected


def test_bad_input_through_the_pipeline(tiny_checkpoint, tmp_path):
    pipe = pipeline("image-text-to-text", model=str(tiny_checkpoint))
    with pytest.raises(TypeError, match="generate_kwargs"):
        pipe(text="hi", do_sample=False)
    with pytest.raises(ValueError, match="image placeholder"):
        pipe(images=[make_image(0), make_image(1)], text="<image> only one placeholder", max_new_tokens=2)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    with pytest.raises(ValueError, match="corrupt, truncated or not an image"):
        pipe(text=[{"role": "user", "content": [{"type": "image", "path": str(corrupt)},
                                                {"type": "text", "text": "hi"}]}], max_new_tokens=2)


@pytest.mark.slow
def test_a_folder_saved_from_python_loads_without_the_package(tiny_checkpoint, tmp_path, local_model, tiny_processor):
    """With leo_mini_hf imported (as for the Trainer), `model.save_pretrained` and `processor.save_pretrained` write
    the remote code too, so the folder loads and generates where the package is not installed."""
    folder = tmp_path / "saved"
    local_model.save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    written = {path.name for path in folder.glob("*.py")}
    assert {"modeling_leo_mini.py", "configuration_leo_mini.py", "mmoe.py", "token_reduction.py",
            "vision_experts.py", "processing_leo_mini.py", "image_processing_leo_mini.py"} <= written
    expected = local_generate(local_model, tiny_processor, [make_image(0)], ["<image> what?"])
    remote = run_without_package(folder, """
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        inputs = processor(images=[make_image(0)], text=["<image> what?"], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        print(json.dumps({"tokens": out[:, inputs["input_ids"].shape[1]:].tolist(), "module": type(model).__module__}))
    """)
    assert remote["tokens"] == expected and not remote["module"].startswith("leo_mini_hf")
