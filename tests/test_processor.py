"""LeoMiniProcessor: placeholder expansion, chat template, padding, decoding, and its refusals."""

import numpy as np
import pytest
import torch
from PIL import Image

IMAGE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (24, 40, 3), dtype=np.uint8))


def test_each_placeholder_becomes_n_v_image_tokens(tiny_processor):
    n_v = tiny_processor.num_image_tokens
    out = tiny_processor(images=[IMAGE, IMAGE], text="<image> left <image> right", return_tensors="pt")
    assert (out["input_ids"] == tiny_processor.image_token_id).sum() == 2 * n_v
    assert out["pixel_values"].shape == (2, 3, 64, 64)
    ids = out["input_ids"][0].tolist()
    first = ids.index(tiny_processor.image_token_id)
    assert ids[first:first + n_v] == [tiny_processor.image_token_id] * n_v


def test_processor_matches_model_config(tiny_checkpoint, tiny_processor):
    from leo_mini_hf import LeoMiniConfig

    config = LeoMiniConfig.from_pretrained(tiny_checkpoint)
    assert tiny_processor.num_image_tokens == config.num_image_tokens
    assert tiny_processor.image_token_id == config.image_token_id
    assert tiny_processor.image_processor.size["height"] == config.image_size


def test_per_text_image_lists_and_left_padding(tiny_processor):
    out = tiny_processor(images=[[IMAGE], []], text=["<image> what colour?", "a longer text only prompt here"],
                         padding=True, return_tensors="pt")
    assert out["pixel_values"].shape[0] == 1
    assert out["attention_mask"][0, 0] == 0 and out["attention_mask"][0, -1] == 1  # left padded
    assert out["input_ids"][0, 0] == tiny_processor.tokenizer.pad_token_id


def test_text_only(tiny_processor):
    out = tiny_processor(text="no image here", return_tensors="pt")
    assert "pixel_values" not in out and out["input_ids"].shape[0] == 1


@pytest.mark.parametrize(
    "images, text, match",
    [
        (None, "<image> hi", r"holds 1 image placeholder.*but 0 image"),
        ([IMAGE, IMAGE], "<image> hi", r"holds 1 image placeholder.*but 2 image"),
        (IMAGE, "no placeholder", r"holds 0 image placeholder.*but 1 image"),
        ([[IMAGE], [IMAGE]], ["<image><image> a", "b"], r"per text: \[2, 0\]"),
        ([[IMAGE]], ["<image> a", "b"], "1 lists of images for 2 text"),
    ],
)
def test_placeholder_image_mismatch_raises(tiny_processor, images, text, match):
    with pytest.raises(ValueError, match=match):
        tiny_processor(images=images, text=text)


def test_truncation_that_cuts_an_image_raises(tiny_processor):
    with pytest.raises(ValueError, match="truncation"):
        tiny_processor(images=IMAGE, text="some words first <image>", truncation=True, max_length=5)
    ok = tiny_processor(images=IMAGE, text="<image> then words that get cut off", truncation=True, max_length=6)
    assert len(ok["input_ids"][0]) == 6


def test_unknown_arguments_raise(tiny_processor):
    with pytest.raises(TypeError, match="unexpected arguments"):
        tiny_processor(text="hi", bogus=1)


@pytest.mark.parametrize("name", ["videos", "audio", "audios"])
def test_empty_videos_and_audio_are_accepted_and_real_ones_refused(tiny_processor, name):
    """Generic callers (lmms-eval's `huggingface` model, pipelines) pass videos=[] and audios=[]."""
    plain = tiny_processor(images=IMAGE, text="<image> hi", return_tensors="pt")
    for empty in (None, [], (), [[]], [[], []]):
        same = tiny_processor(images=IMAGE, text="<image> hi", return_tensors="pt", **{name: empty})
        assert same.keys() == plain.keys() and all(torch.equal(same[k], plain[k]) for k in plain)
    with pytest.raises(ValueError, match=f"images and text only: got non-empty {name}"):
        tiny_processor(text="hi", **{name: [np.zeros((2, 4, 4, 3))]})
    with pytest.raises(ValueError, match=f"non-empty {name}"):
        tiny_processor(text="hi", **{name: [[], [np.zeros(16000)]]})


def test_chat_template_renders_images_and_marks_answers(tiny_processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    text = tiny_processor.apply_chat_template(messages)
    assert text == "<|im_start|>user\n<image>What colour?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
    prompt = tiny_processor.apply_chat_template(messages[:1], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    messages[0]["content"][0]["image"] = IMAGE
    out = tiny_processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt",
                                             return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"][0].tolist(), out["assistant_masks"][0].tolist()
    answer = tiny_processor.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert answer == "red<|im_end|>"
    assert out["pixel_values"].shape[0] == 1


def test_decoding_strips_image_tokens(tiny_processor):
    ids = tiny_processor(images=IMAGE, text="<|im_start|>user\n<image>hi", return_tensors="pt")["input_ids"]
    assert tiny_processor.batch_decode(ids) == ["user\nhi"]
    assert tiny_processor.batch_decode(ids, skip_special_tokens=False) == ["<|im_start|>user\nhi"]
    assert tiny_processor.post_process_image_text_to_text(ids) == ["user\nhi"]
    assert tiny_processor.decode(ids[0]) == "user\nhi"


@pytest.mark.parametrize("call, error, match", [
    ({"text": []}, ValueError, "empty list"),
    ({"text": 5}, TypeError, "string or a list of strings, got int"),
    ({"text": "hi", "max_length": -1, "truncation": True}, ValueError, "max_length must be a positive int"),
    ({"text": "<image> hi", "images": IMAGE, "image_mean": [0.5, 0.5]}, ValueError, "image_mean must hold 3"),
])
def test_bad_processor_arguments_say_what_is_wrong(tiny_processor, call, error, match):
    with pytest.raises(error, match=match):
        tiny_processor(**call)


@pytest.mark.parametrize("text", ["", ["", "What colour?"], ["What colour?", ""]])
def test_an_empty_prompt_is_refused(tiny_processor, text):
    """An empty text gave a float (1, 0) input_ids that `generate` then refused as a dtype problem; in a batch, a row
    of padding only that generated noise."""
    row = 0 if isinstance(text, str) else text.index("")
    with pytest.raises(ValueError, match=rf"Text {row} gives no tokens \(an empty prompt\)"):
        tiny_processor(text=text, padding=True)
