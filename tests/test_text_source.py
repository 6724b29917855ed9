"""`cotr_text_source="user"`: CoTR's text term sums only the user's words, marked by the processor."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from helpers.tiny_models import tiny_config
from helpers.training_data import overfit_set
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.cli import main as cli
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.elastic import keep_visual_tokens
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments
from helpers.without_package import run_without_package


def make_image(seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))


def chat(question, image, system=None, answer=None):
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": question}]})
    if answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@pytest.fixture(scope="module")
def user_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-text") / "tiny"
    cli(["build", "--preset", "tiny", "--random-init", "--out", str(folder), "--set", "cotr_text_source=user",
         "--set", "cotr_budgets=[1, 4]"])
    return folder


@pytest.fixture(scope="module")
def processor(user_checkpoint):
    return LeoMiniProcessor.from_pretrained(user_checkpoint)


@pytest.fixture(scope="module")
def model(user_checkpoint):
    return LeoMiniForConditionalGeneration.from_pretrained(user_checkpoint).eval()


def inputs_for(processor, conversations, **kwargs):
    return processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                         add_generation_prompt=True, processor_kwargs={"padding": True, **kwargs})


def marked_text(processor, inputs, row=0):
    ids = inputs["input_ids"][row][inputs["text_condition_mask"][row].bool()]
    return processor.tokenizer.decode(ids)


def test_the_option_is_checked_and_saved(user_checkpoint, processor):
    assert tiny_config().cotr_text_source == "prompt"
    with pytest.raises(ValueError, match="cotr_text_source"):
        tiny_config(cotr_text_source="question")
    with pytest.raises(ValueError, match="needs CoTR's text term"):
        tiny_config(cotr_text_source="user", token_reduction="avg_pool", num_visual_tokens=4)
    with pytest.raises(ValueError, match="needs CoTR's text term"):
        tiny_config(cotr_text_source="user", cotr_text_conditioning=False)
    assert json.loads((user_checkpoint / "config.json").read_text())["cotr_text_source"] == "user"
    assert json.loads((user_checkpoint / "processor_config.json").read_text())["cotr_text_source"] == "user"
    assert processor.cotr_text_source == "user" and "text_condition_mask" in processor.model_input_names
    with pytest.raises(ValueError, match="cotr_text_source must be one of"):
        LeoMiniProcessor(processor.image_processor, processor.tokenizer, cotr_text_source="all")


def test_the_mask_marks_exactly_the_user_words(processor):
    image = make_image(0)
    conversation = chat("What colour is the circle?", image, system="Answer in one word.", answer="circle")
    conversation += [{"role": "user", "content": [{"type": "text", "text": "And the square?"}]}]
    short = chat("Shape?", make_image(1))
    inputs = inputs_for(processor, [conversation, short])
    assert inputs["text_condition_mask"].shape == inputs["input_ids"].shape
    assert marked_text(processor, inputs, 0) == "What colour is the circle?And the square?"
    assert marked_text(processor, inputs, 1) == "Shape?"  # padded row: padding and template tokens unmarked
    assert not inputs["text_condition_mask"][inputs["input_ids"] == processor.image_token_id].any()
    # the assistant's answer repeats a user word ("circle") and is not marked
    direct = processor(text="<image>Is it red?", images=[image], return_tensors="pt")
    assert processor.tokenizer.decode(direct["input_ids"][0][direct["text_condition_mask"][0].bool()]) == "Is it red?"
    assert "text_condition_mask" not in prompt_source_processor(processor)(text="<image>Is it red?", images=[image])


def test_a_template_that_rewrites_the_text_is_refused(processor):
    upper = processor.chat_template.replace("{{- block['text'] -}}", "{{- block['text'] | upper -}}")
    with pytest.raises(ValueError, match="renders each text block verbatim"):
        processor.apply_chat_template([chat("What colour?", make_image(0))], chat_template=upper, tokenize=True,
                                      return_dict=True)


def prompt_source_processor(processor):
    return LeoMiniProcessor(processor.image_processor, processor.tokenizer, chat_template=processor.chat_template,
                            num_image_tokens=4, visual_token_budgets=[1, 4])


def test_cotr_reads_only_the_user_words(user_checkpoint, model, processor):
    """The visual tokens do not change with the system prompt (template text) but do with the user's words; a
    prompt-source model's do change with the system prompt."""
    image = make_image(2)

    def visual_tokens(model, processor, conversation):
        with torch.no_grad():
            return model(**inputs_for(processor, [conversation])).image_hidden_states

    plain = visual_tokens(model, processor, chat("What colour is it?", image))
    with_system = visual_tokens(model, processor, chat("What colour is it?", image, system="Be brief."))
    other_question = visual_tokens(model, processor, chat("What shape is it?", image))
    # the random tiny model's visual tokens are ~1e-3 and its text term small: the user's words move them ~4e-5
    torch.testing.assert_close(with_system, plain, rtol=1e-4, atol=1e-8)
    assert (other_question - plain).abs().max() > 1e-5
    prompt_model = LeoMiniForConditionalGeneration.from_pretrained(user_checkpoint, cotr_text_source="prompt").eval()
    prompt_processor = prompt_source_processor(processor)
    assert (visual_tokens(prompt_model, prompt_processor, chat("What colour is it?", image, system="Be brief."))
            - visual_tokens(prompt_model, prompt_processor, chat("What colour is it?", image))).abs().max() > 1e-5


def test_the_model_refuses_a_missing_or_misshapen_mask(model, processor):
    inputs = inputs_for(processor, [chat("What colour?", make_image(0))])
    without = {key: value for key, value in inputs.items() if key != "text_condition_mask"}
    with pytest.raises(ValueError, match="pass text_condition_mask"):
        model(**without)
    with pytest.raises(ValueError, match=r"text_condition_mask must be a tensor of shape \(1, "):
        model(**without, text_condition_mask=inputs["text_condition_mask"][:, 1:])
    prompt_model = LeoMiniForConditionalGeneration(tiny_config()).eval()
    prompt_inputs = prompt_source_processor(processor)(text="<image>What?", images=[make_image(0)],
                                                       return_tensors="pt")
    with pytest.raises(ValueError, match="read only by models with cotr_text_source='user'"):
        prompt_model(**prompt_inputs, text_condition_mask=torch.ones_like(prompt_inputs["input_ids"]))


def test_generate_batches_beams_and_pipeline(model, processor):
    conversations = [chat("What colour is the big shape?", make_image(3)), chat("Shape?", make_image(4))]
    batch = inputs_for(processor, conversations)
    batched = model.generate(**batch, max_new_tokens=4, do_sample=False)
    batched_beams = model.generate(**batch, max_new_tokens=4, do_sample=False, num_beams=2)
    for row, conversation in enumerate(conversations):
        alone = inputs_for(processor, [conversation])
        for options, expected in (({}, batched), ({"use_cache": False}, batched), ({"num_beams": 2}, batched_beams)):
            generated = model.generate(**alone, max_new_tokens=4, do_sample=False, **options)
            tokens = generated[0, alone["input_ids"].shape[1]:]
            assert tokens.tolist() == expected[row, batch["input_ids"].shape[1]:].tolist(), (row, options)
    at_one = inputs_for(processor, [conversations[0]], num_visual_tokens=1)
    assert (at_one["input_ids"] == processor.image_token_id).sum() == 1 and at_one["text_condition_mask"].sum() > 0
    model.generate(**at_one, max_new_tokens=2, do_sample=False)
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    text = pipe(text=conversations[1], max_new_tokens=4, return_full_text=False)[0]["generated_text"]
    assert text == processor.decode(batched[1, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_training_carries_the_mask(user_checkpoint, processor, tmp_path):
    collated = LeoMiniDataCollator(processor)(overfit_set(1)[:3])
    assert collated["text_condition_mask"].shape == collated["input_ids"].shape
    assert not (collated["text_condition_mask"].bool() & (collated["labels"] != -100)).any()  # never the answer
    shortened = keep_visual_tokens(collated, 1, 4, processor.image_token_id, processor.tokenizer.pad_token_id)
    at_one = LeoMiniDataCollator(processor, num_visual_tokens=1)(overfit_set(1)[:3])
    for key in ("input_ids", "text_condition_mask", "labels"):
        assert torch.equal(shortened[key], at_one[key]), key
    model = LeoMiniForConditionalGeneration.from_pretrained(user_checkpoint)
    trainer = LeoMiniTrainer(model=model, train_dataset=overfit_set(1), data_collator=LeoMiniDataCollator(processor),
                             processing_class=processor,
                             args=default_training_arguments(output_dir=str(tmp_path), max_steps=2, use_cpu=True,
                                                             per_device_train_batch_size=2, logging_steps=1))
    trainer.train()
    assert all(np.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)


@pytest.mark.slow
def test_remote_code_without_the_package(user_checkpoint, model, processor):
    result = run_without_package(user_checkpoint, """
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        conversation = [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": [{"type": "image", "image": make_image(5)},
                                                     {"type": "text", "text": "What colour?"}]}]
        inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                               add_generation_prompt=True)
        marked = processor.tokenizer.decode(inputs["input_ids"][0][inputs["text_condition_mask"][0].bool()])
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0].tolist()
        print(json.dumps({"marked": marked, "tokens": tokens}))
    """)
    assert result["marked"] == "What colour?"
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image", "image": make_image(5)},
                                                 {"type": "text", "text": "What colour?"}]}]
    local = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                          add_generation_prompt=True)
    assert model.generate(**local, max_new_tokens=4, do_sample=False)[0].tolist() == result["tokens"]


def test_evaluation_and_lmms_eval_pass_the_mask(user_checkpoint, model, processor):
    from leo_mini_hf.easyvqa.dataset import EasyVQADataset
    from leo_mini_hf.easyvqa.evaluation import answer_questions, prompt_inputs

    samples = [EasyVQADataset("test")[index] for index in range(3)]
    assert "text_condition_mask" in prompt_inputs(processor, samples)
    answers = answer_questions(model, processor, samples, batch_size=3, max_new_tokens=3)
    assert answers == [answer_questions(model, processor, [sample], max_new_tokens=3)[0] for sample in samples]

    pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test` (pip install --no-deps lmms-eval)")
    from types import SimpleNamespace

    import torch.nn.functional as F

    from leo_mini_hf.lmms.model import LeoMiniLmms
    from leo_mini_hf.lmms.tasks import doc_to_visual, easy_vqa_documents

    documents = easy_vqa_documents("easy-vqa", "test")[:2]
    lmms = LeoMiniLmms(pretrained=str(user_checkpoint), batch_size=2)
    lmms.task_dict = {"easy": {"test": documents}}
    requests = [SimpleNamespace(args=(documents[i]["question"], " red", doc_to_visual, i, "easy", "test"))
                for i in range(2)]
    results = lmms.loglikelihood(requests)  # one right-padded batch of 2
    target = processor.tokenizer(" red", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    for doc_id, (value, _) in enumerate(results):
        conversation = [{"role": "user", "content": [{"type": "image", "image": doc_to_visual(documents[doc_id])[0]},
                                                     {"type": "text", "text": documents[doc_id]["question"]}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        length = inputs["input_ids"].shape[1]
        input_ids = torch.cat([inputs["input_ids"], target[None]], dim=1)
        mask = torch.nn.functional.pad(inputs["text_condition_mask"], (0, len(target)))
        with torch.no_grad():
            logits = model(input_ids=input_ids, pixel_values=inputs["pixel_values"], text_condition_mask=mask).logits
        log_probs = F.log_softmax(logits[0, length - 1:-1].float(), dim=-1)
        assert value == pytest.approx(log_probs[torch.arange(len(target)), target].sum().item(), abs=1e-4)
