"""Elastic CoTR (`cotr_budgets`): one checkpoint, a visual-token budget chosen per call and per sample."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline

from helpers.tiny_models import tiny_config, tiny_model
from helpers.training_data import overfit_set
from leo_mini_hf import LeoMiniForConditionalGeneration, LeoMiniProcessor
from leo_mini_hf.cli import main as cli
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.elastic import BudgetSchedule, keep_visual_tokens
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments
from helpers.without_package import run_without_package

BUDGETS = [1, 2, 4]  # the tiny preset's num_visual_tokens is 4
CHAT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]


def make_image(seed):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (30, 40, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def elastic_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("elastic") / "tiny"
    cli(["build", "--preset", "tiny", "--random-init", "--out", str(folder), "--set", f"cotr_budgets={BUDGETS}"])
    return folder


@pytest.fixture(scope="module")
def processor(elastic_checkpoint):
    return LeoMiniProcessor.from_pretrained(elastic_checkpoint)


@pytest.fixture(scope="module")
def model():
    """An elastic tiny model whose MMoE adapters change the output (random LoRA B), so routing differences show."""
    return tiny_model(cotr_budgets=BUDGETS)


def reduced_token_counts(model):
    """Attach a hook recording the token count of every CoTR output; returns (counts list, hook handle)."""
    counts = []
    handle = model.model.token_reducer.register_forward_hook(lambda module, args, out: counts.append(out.shape[1]))
    return counts, handle


# ---- configuration ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, error, match", [
    ({"cotr_budgets": [1, 4, 2]}, ValueError, "strictly increasing"),
    ({"cotr_budgets": [1, 1, 4]}, ValueError, "strictly increasing"),
    ({"cotr_budgets": [0, 4]}, ValueError, "positive"),
    ({"cotr_budgets": [1, 2]}, ValueError, "must equal num_visual_tokens=4"),
    ({"cotr_budgets": []}, TypeError, "non-empty list of ints"),
    ({"cotr_budgets": [1, 2.0, 4]}, TypeError, "non-empty list of ints"),
    ({"cotr_budgets": 4}, TypeError, "cotr_budgets"),
    ({"cotr_budgets": [1, 4], "token_reduction": "avg_pool"}, ValueError, "token_reduction='cotr'"),
])
def test_bad_budgets_are_refused_by_name(overrides, error, match):
    with pytest.raises(error, match=match):
        tiny_config(**overrides)


def test_budgets_round_trip_and_default_to_the_fixed_budget(tmp_path):
    config = tiny_config(cotr_budgets=(1, 2, 4))
    assert config.cotr_budgets == [1, 2, 4] and config.visual_token_budgets == [1, 2, 4]
    config.save_pretrained(tmp_path)
    assert type(config).from_pretrained(tmp_path).cotr_budgets == [1, 2, 4]
    assert tiny_config().visual_token_budgets == [4]


# ---- the model ----------------------------------------------------------------------------------------------------

def prompt_ids(config, budget, text_after=(12, 13, 14)):
    return [config.text_config.bos_token_id, 10, 11, *[config.image_token_id] * budget, *text_after]


@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_k_gives_k_tokens_per_image_and_the_first_k_of_the_full_budget(model, budget):
    size = model.config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([prompt_ids(model.config, budget)] * 2)
    counts, handle = reduced_token_counts(model)
    with torch.no_grad():
        at_budget = model(input_ids=ids, pixel_values=pixels).image_hidden_states
        full = model.get_image_features(pixels, torch.zeros(2, model.config.text_config.hidden_size))
        at_budget_no_text = model.get_image_features(pixels, torch.zeros(2, model.config.text_config.hidden_size),
                                                     torch.full((2,), budget))
    handle.remove()
    assert counts[0] == budget and at_budget.shape == (2, budget, model.config.text_config.hidden_size)
    torch.testing.assert_close(at_budget_no_text, full[:, :budget])  # nested queries: the first k of N_V


def padded_batch(rows, left=True):
    length = max(len(row) for row in rows)
    ids, mask = [], []
    for row in rows:
        pad = [0] * (length - len(row))
        ids.append(pad + row if left else row + pad)
        mask.append([0] * len(pad) + [1] * len(row) if left else [1] * len(row) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


def test_a_mixed_budget_batch_equals_each_sample_alone(model):
    config = model.config
    pixels = torch.randn(3, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(1))
    budgets = [1, 4, 2]
    rows = [prompt_ids(config, 1), prompt_ids(config, 4, (12, 13)), prompt_ids(config, 2)]
    ids, mask = padded_batch(rows)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        for index, (row, budget) in enumerate(zip(rows, budgets)):
            alone = model(input_ids=torch.tensor([row]), pixel_values=pixels[index:index + 1])
            torch.testing.assert_close(batch.logits[index, -len(row):], alone.logits[0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(batch.routing_context[index], alone.routing_context[0], rtol=1e-4, atol=1e-5)
            assert not batch.image_hidden_states[index, budget:].any()  # rows past the budget are zeros


@pytest.mark.parametrize("generate_kwargs", [{}, {"use_cache": False}, {"num_beams": 2}])
def test_generate_on_a_mixed_budget_batch_equals_each_sample_alone(model, processor, generate_kwargs):
    images = [make_image(0), make_image(1), make_image(2)]
    texts = [processor.apply_chat_template(CHAT, add_generation_prompt=True)] * 3
    budgets = [4, 1, 2]
    inputs = processor(images=images, text=texts, num_visual_tokens=budgets, padding=True, padding_side="left",
                       return_tensors="pt")
    assert (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist() == budgets
    with torch.no_grad():
        batch = model.generate(**inputs, max_new_tokens=4, do_sample=False, **generate_kwargs)
        for image, text, budget, row in zip(images, texts, budgets, batch):
            alone_inputs = processor(images=image, text=text, num_visual_tokens=budget, return_tensors="pt")
            alone = model.generate(**alone_inputs, max_new_tokens=4, do_sample=False, **generate_kwargs)
            assert row[-4:].tolist() == alone[0, -4:].tolist()


def test_image_blocks_that_fit_no_budget_or_the_image_count_are_refused(model):
    config = model.config
    pixels = torch.zeros(1, 3, config.image_size, config.image_size)
    with pytest.raises(ValueError, match=r"blocks of \[3\] image tokens, which cannot hold 1 image"):
        model(input_ids=torch.tensor([prompt_ids(config, 3)]), pixel_values=pixels)
    two_blocks = prompt_ids(config, 1) + [config.image_token_id] * 2
    with pytest.raises(ValueError, match=r"blocks of \[1, 2\] image tokens, which cannot hold 1 image"):
        model(input_ids=torch.tensor([two_blocks]), pixel_values=pixels)
    with pytest.raises(ValueError, match=r"tokens_per_image must hold one of \[1, 2, 4\]"):
        model.get_image_features(pixels, tokens_per_image=torch.tensor([3]))


def test_adjacent_images_are_read_by_the_image_count_and_ambiguity_is_refused(model):
    """A block of 4 image tokens is one image at budget 4, two at 2 or four at 1: the image count decides; when two
    blocks could share the images either way, the model says so instead of guessing."""
    config = model.config
    pixels = torch.randn(4, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([prompt_ids(config, 4)])
    with torch.no_grad():
        for count in (1, 2, 4):
            features = model(input_ids=ids, pixel_values=pixels[:count]).image_hidden_states
            assert features.shape[:2] == (count, 4 // count)
        ambiguous = torch.tensor([prompt_ids(config, 4), prompt_ids(config, 4)])  # 3 images: 2 + 1 or 1 + 2
        with pytest.raises(ValueError, match="can hold in more than one way 3 image"):
            model(input_ids=ambiguous, pixel_values=pixels[:3])


def test_a_fixed_budget_model_refuses_another_budget(tiny_processor):
    with pytest.raises(ValueError, match=r"not one of this model's visual-token budgets: its fixed N_V is \[4\]"):
        tiny_processor(images=make_image(0), text="<image> hi", num_visual_tokens=2)
    assert tiny_processor.visual_token_budgets is None


# ---- the processor ------------------------------------------------------------------------------------------------

def test_processor_budgets_per_call_and_per_text(processor):
    text = processor.apply_chat_template(CHAT, add_generation_prompt=True)
    image_tokens = lambda inputs: (inputs["input_ids"] == processor.image_token_id).sum(dim=1).tolist()  # noqa: E731
    assert image_tokens(processor(images=make_image(0), text=text, return_tensors="pt")) == [4]
    assert image_tokens(processor(images=[make_image(0), make_image(1)], text=[text, text], num_visual_tokens=2,
                                  padding=True, return_tensors="pt")) == [2, 2]
    with pytest.raises(ValueError, match="num_visual_tokens=3 is not one of this model's visual-token budgets"):
        processor(images=make_image(0), text=text, num_visual_tokens=3)
    with pytest.raises(ValueError, match="2 values for 1 text"):
        processor(images=make_image(0), text=text, num_visual_tokens=[1, 2])
    with pytest.raises(TypeError, match="an int or a list of ints"):
        processor(images=make_image(0), text=text, num_visual_tokens="2")
    chat = [{"role": "user", "content": [{"type": "image", "image": make_image(0)}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"num_visual_tokens": 1})
    assert image_tokens(inputs) == [1]


def test_pipeline_takes_the_budget_through_processor_kwargs(elastic_checkpoint, processor):
    pipe = pipeline("image-text-to-text", model=str(elastic_checkpoint))
    chat = [{"role": "user", "content": [{"type": "image", "image": make_image(3)},
                                         {"type": "text", "text": "What colour is the shape?"}]}]
    for budget in BUDGETS:
        counts, handle = reduced_token_counts(pipe.model)
        output = pipe(text=chat, max_new_tokens=4, return_full_text=False, generate_kwargs={"do_sample": False},
                      processor_kwargs={"num_visual_tokens": budget})
        handle.remove()
        assert counts == [budget]
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", processor_kwargs={"num_visual_tokens": budget})
        with torch.no_grad():
            expected = pipe.model.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert output[0]["generated_text"] == processor.decode(expected[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_remote_code_without_the_package_serves_every_budget(elastic_checkpoint, processor):
    model = LeoMiniForConditionalGeneration.from_pretrained(elastic_checkpoint).eval()
    text = processor.apply_chat_template(CHAT, add_generation_prompt=True)
    expected = {}
    for budget in BUDGETS:
        inputs = processor(images=make_image(4), text=text, num_visual_tokens=budget, return_tensors="pt")
        with torch.no_grad():
            expected[str(budget)] = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, -4:].tolist()
    remote = run_without_package(elastic_checkpoint, f"""
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        text = processor.apply_chat_template(CHAT, add_generation_prompt=True)
        out = {{}}
        for budget in {BUDGETS}:
            inputs = processor(images=make_image(4), text=text, num_visual_tokens=budget, return_tensors="pt")
            with torch.no_grad():
                out[str(budget)] = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, -4:].tolist()
        try:
            processor(images=make_image(4), text=text, num_visual_tokens=3)
            out["refused"] = False
        except ValueError:
            out["refused"] = True
        print(json.dumps(out))
    """)
    assert remote.pop("refused") is True
    assert remote == expected


# ---- training -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget", [1, 2])
def test_keeping_k_image_tokens_equals_collating_at_budget_k(processor, budget):
    samples = overfit_set(1)[:3]
    full = LeoMiniDataCollator(processor)(samples)
    expected = LeoMiniDataCollator(processor, num_visual_tokens=budget)(samples)
    kept = keep_visual_tokens(full, budget, 4, processor.image_token_id, processor.tokenizer.pad_token_id)
    assert set(kept) == set(expected)
    for key in expected:
        assert torch.equal(kept[key], expected[key]), key


def test_keep_visual_tokens_refuses_inputs_it_cannot_shorten(processor):
    batch = LeoMiniDataCollator(processor)(overfit_set(1)[:2])
    with pytest.raises(ValueError, match=r"per-token inputs \['position_ids'\]"):
        keep_visual_tokens({**batch, "position_ids": torch.zeros_like(batch["input_ids"])}, 1, 4,
                           processor.image_token_id, 0)


def test_budget_schedule_is_seeded_per_step_and_follows_its_weights():
    schedule = BudgetSchedule(BUDGETS, seed=3)
    sequence = [schedule.budget(step) for step in range(300)]
    assert sequence == [BudgetSchedule(BUDGETS, seed=3).budget(step) for step in range(300)]
    assert sequence[150:] == [schedule.budget(step) for step in range(150, 300)]  # any step alone: resumable
    assert sequence != [BudgetSchedule(BUDGETS, seed=4).budget(step) for step in range(300)]
    assert {budget: sequence.count(budget) for budget in BUDGETS} == pytest.approx({1: 100, 2: 100, 4: 100}, abs=30)
    weighted = [BudgetSchedule(BUDGETS, [0, 1, 3], seed=0).budget(step) for step in range(400)]
    assert 1 not in weighted and 230 < weighted.count(4) < 370
    for weights, match in (([1, 1], "2 budget weights for the 3 budgets"), ([1, -1, 1], "non-negative"),
                           ([0, 0, 0], "not all zero")):
        with pytest.raises(ValueError, match=match):
            BudgetSchedule(BUDGETS, weights)


def elastic_trainer(checkpoint, processor, output_dir, **arguments):
    torch.manual_seed(0)
    model = LeoMiniForConditionalGeneration.from_pretrained(checkpoint)
    budget_weights = arguments.pop("budget_weights", None)
    budget_loss = arguments.pop("budget_loss", "sampled")
    defaults = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                "logging_steps": 1, "save_strategy": "no", "seed": 0, "use_cpu": True}
    return LeoMiniTrainer(model=model, args=default_training_arguments(**{**defaults, **arguments}),
                          train_dataset=overfit_set(), data_collator=LeoMiniDataCollator(processor),
                          processing_class=processor, budget_weights=budget_weights, budget_loss=budget_loss)


def test_training_draws_one_budget_per_step_and_a_resumed_run_replays_them(elastic_checkpoint, processor, tmp_path):
    trainer = elastic_trainer(elastic_checkpoint, processor, tmp_path / "full", max_steps=8,
                              gradient_accumulation_steps=2, per_device_train_batch_size=2)
    counts, handle = reduced_token_counts(trainer.model)
    trainer.train()
    handle.remove()
    schedule = BudgetSchedule(BUDGETS, seed=0)
    assert counts == [schedule.budget(step) for step in range(8) for _ in range(2)]  # both micro-batches of a step
    assert len(set(counts)) > 1

    first = elastic_trainer(elastic_checkpoint, processor, tmp_path / "resumed", max_steps=8, save_strategy="steps",
                            save_steps=4)
    first.train()
    resumed = elastic_trainer(elastic_checkpoint, processor, tmp_path / "resumed", max_steps=8)
    counts, handle = reduced_token_counts(resumed.model)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    handle.remove()
    assert counts == [schedule.budget(step) for step in range(4, 8)]
    uninterrupted = elastic_trainer(elastic_checkpoint, processor, tmp_path / "once", max_steps=8)
    uninterrupted.train()
    losses = lambda trainer: [log["loss"] for log in trainer.state.log_history if "loss" in log]  # noqa: E731
    torch.testing.assert_close(torch.tensor(losses(resumed)[-4:]), torch.tensor(losses(uninterrupted)[-4:]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("weights", [None, [0, 1, 3]])
def test_summed_budget_loss_trains_every_budget_of_non_zero_weight_each_step(elastic_checkpoint, processor, tmp_path,
                                                                             weights):
    trainer = elastic_trainer(elastic_checkpoint, processor, tmp_path, max_steps=3, budget_loss="summed",
                              budget_weights=weights)
    counts, handle = reduced_token_counts(trainer.model)
    trainer.train()
    handle.remove()
    trained = [1, 2, 4] if weights is None else [2, 4]
    assert counts == trained * 3

    model, config = trainer.model.train(), trainer.model.config
    batch = LeoMiniDataCollator(processor)([overfit_set()[index] for index in range(4)])
    keep = lambda budget: keep_visual_tokens(batch, budget, config.num_image_tokens,  # noqa: E731
                                             config.image_token_id, processor.tokenizer.pad_token_id)
    with torch.no_grad():
        budget_losses = {budget: model(**keep(budget)).loss for budget in BUDGETS}
        summed = trainer.compute_loss(model, batch)
    probabilities = dict(zip(BUDGETS, np.asarray(weights or [1, 1, 1]) / sum(weights or [1, 1, 1])))
    expected = sum(probabilities[budget] * budget_losses[budget] for budget in BUDGETS)
    torch.testing.assert_close(summed, expected.float())
    assert len({round(float(loss), 4) for loss in budget_losses.values()}) == 3  # the budgets' losses differ


@pytest.mark.parametrize("arguments, match", [
    ({"budget_weights": [1.0]}, "budget_weights and budget_loss need an elastic model"),
    ({"budget_loss": "summed"}, "budget_weights and budget_loss need an elastic model"),
    ({"budget_loss": "mean"}, "budget_loss must be one of"),
])
def test_budget_options_need_an_elastic_model_and_a_known_loss(tiny_checkpoint, tiny_processor, tmp_path, arguments,
                                                              match):
    with pytest.raises(ValueError, match=match):
        elastic_trainer(tiny_checkpoint, tiny_processor, tmp_path, max_steps=1, **arguments)


def test_train_and_eval_commands_take_budgets(elastic_checkpoint, tmp_path, capsys):
    out = tmp_path / "run"
    cli(["train", "--model", str(elastic_checkpoint), "--data", "easy-vqa", "--limit", "8", "--output_dir", str(out),
         "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
         "--budget_weights", "1,0,0", "--budget_loss", "summed"])
    trained = LeoMiniForConditionalGeneration.from_pretrained(out)
    assert trained.config.cotr_budgets == BUDGETS
    assert LeoMiniProcessor.from_pretrained(out).visual_token_budgets == BUDGETS
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(["train", "--model", str(elastic_checkpoint), "--data", "easy-vqa", "--output_dir", str(tmp_path / "x"),
             "--budget_weights", "1,a,2", "--use_cpu"])
    assert "--budget_weights must be comma-separated numbers" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["train", "--model", str(elastic_checkpoint), "--data", "easy-vqa", "--output_dir", str(tmp_path / "x"),
             "--budget_loss", "mean", "--use_cpu"])
    assert "invalid choice: 'mean'" in capsys.readouterr().err
    cli(["eval", "--model", str(out), "--limit", "4", "--num-visual-tokens", "1"])
    assert '"count": 4' in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["eval", "--model", str(out), "--limit", "4", "--num-visual-tokens", "3"])
    assert "num_visual_tokens=3 is not one of" in capsys.readouterr().err


def test_demo_takes_a_budget(elastic_checkpoint, capsys):
    image = elastic_checkpoint.parent / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    cli(["demo", "--model", str(elastic_checkpoint), "--image", str(image), "--question", "What colour?",
         "--num-visual-tokens", "2", "--max-new-tokens", "2"])
    assert "-> 2 after CoTR (elastic: budgets [1, 2, 4])" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["demo", "--model", str(elastic_checkpoint), "--image", str(image), "--question", "What colour?",
             "--num-visual-tokens", "3"])
    assert "not one of this model's visual-token budgets" in capsys.readouterr().err


def test_lmms_eval_model_takes_a_budget(elastic_checkpoint):
    pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make test` (pip install --no-deps lmms-eval)")
    from leo_mini_hf.lmms.model import LeoMiniLmms

    sample = {"messages": [{"role": "user", "content": [{"type": "image", "image": make_image(5)},
                                                        {"type": "text", "text": "What colour?"}]}]}
    for budget, expected in ((None, 4), ("2", 2)):
        lmms = LeoMiniLmms(pretrained=str(elastic_checkpoint), device="cpu", num_visual_tokens=budget)
        assert (lmms._inputs([sample])["input_ids"] == lmms.processor.image_token_id).sum() == expected
    with pytest.raises(ValueError, match="num_visual_tokens=3 is not one of"):
        LeoMiniLmms(pretrained=str(elastic_checkpoint), device="cpu", num_visual_tokens=3)


def test_the_random_demo_checks_a_budget_with_the_processors_check(capsys):
    with pytest.raises(SystemExit):
        cli(["demo", "--preset", "tiny", "--num-visual-tokens", "3"])
    assert "num_visual_tokens=3 is not one of this model's visual-token budgets: its fixed N_V is [4]" in \
        capsys.readouterr().err
