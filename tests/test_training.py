"""Fine-tuning with the HF Trainer on the tiny model: data, masking, stages, loss, resume, PEFT, two processes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers.ports import free_port
from helpers.tiny_models import tiny_config as tiny_config_with
from helpers.training_data import colour_sample, frozen_fingerprint, overfit_set
from leo_mini_hf import LeoMiniForConditionalGeneration
from leo_mini_hf.cli import main as cli
from leo_mini_hf.training.collator import LeoMiniDataCollator
from leo_mini_hf.training.data import LlavaConversationDataset
from leo_mini_hf.training.stages import STAGE_PARTS, apply_training_stage
from leo_mini_hf.training.trainer import LeoMiniTrainer, default_training_arguments, logits_to_keep_for_labels

TESTS = Path(__file__).parent


def load(checkpoint, stage="finetune", **config_overrides):
    torch.manual_seed(0)
    model = LeoMiniForConditionalGeneration.from_pretrained(checkpoint, **config_overrides)
    apply_training_stage(model, stage)
    return model


def train(checkpoint, processor, output_dir, dataset, stage="finetune", model=None, **arguments):
    model = model if model is not None else load(checkpoint, stage)
    defaults = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "learning_rate": 5e-3,
                "logging_steps": 1, "save_strategy": "no", "seed": 0, "use_cpu": True}
    trainer = LeoMiniTrainer(model=model, args=default_training_arguments(**{**defaults, **arguments}),
                             train_dataset=dataset, data_collator=LeoMiniDataCollator(processor),
                             processing_class=processor)
    return trainer


def losses_of(trainer):
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


# ---- data -------------------------------------------------------------------------------------------------------

def test_labels_cover_exactly_the_answers(tiny_processor):
    samples = [colour_sample("red"), colour_sample("blue")]
    samples.append({"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]},
                                 {"role": "assistant", "content": [{"type": "text", "text": "hi there"}]}]})
    batch = LeoMiniDataCollator(tiny_processor)(samples)
    assert batch["pixel_values"].shape[0] == 2
    decode = tiny_processor.tokenizer.decode
    for row, answer in enumerate(["red", "blue", "hi there"]):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert decode(labelled) == f"{answer}<|im_end|>"
    assert (batch["labels"][batch["input_ids"] == tiny_processor.image_token_id] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
    assert batch["attention_mask"][:, 0].all()  # padded on the right for training


def write_records(folder: Path, records) -> Path:
    Image.new("RGB", (8, 8), "red").save(folder / "red.png")
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


GOOD = [
    {"id": "a", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                      {"from": "gpt", "value": "red"},
                                                      {"from": "human", "value": "Sure?"},
                                                      {"from": "gpt", "value": "yes"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi"}]},
    {"id": "c", "image": "red.png", "conversations": [{"from": "human", "value": "No placeholder"},
                                                      {"from": "gpt", "value": "red"}]},
]


def test_a_training_sample_conditions_cotr_and_the_router_on_the_prompt_its_generation_sees(tiny_checkpoint,
                                                                                          tiny_processor):
    """The same conversation as a training sample (prompt + answer + the template's closing newline, labels on the
    answer) and as a generation prompt: CoTR's text sum, the visual tokens and the MMoE routing context are equal."""
    from leo_mini_hf.modeling.token_reduction import prompt_text_mask, prompt_text_sum

    model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    image = Image.new("RGB", (40, 40), (255, 0, 0))
    question = [{"type": "image", "image": image}, {"type": "text", "text": "what colour?"}]
    answer = [{"type": "text", "text": "red"}]
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    training = LeoMiniDataCollator(tiny_processor)([{"messages": messages}])
    generation = tiny_processor.apply_chat_template([messages[:1]], add_generation_prompt=True, tokenize=True,
                                                    return_dict=True, return_tensors="pt")
    assert training["labels"][0, -1] == -100  # the closing newline: not an answer, and absent at generation
    sums = []
    for inputs in (training, generation):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        mask = prompt_text_mask(inputs["input_ids"], embeds, inputs["attention_mask"], inputs.get("labels"),
                                model.config.image_token_id)
        sums.append(prompt_text_sum(embeds, mask))
    torch.testing.assert_close(sums[0], sums[1], rtol=0, atol=0)
    with torch.no_grad():
        trained_on, generated_from = model(**training), model(**generation)
    torch.testing.assert_close(trained_on.image_hidden_states, generated_from.image_hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(trained_on.routing_context, generated_from.routing_context, rtol=0, atol=0)


def test_llava_json_dataset(tmp_path, tiny_processor):
    dataset = LlavaConversationDataset(write_records(tmp_path, GOOD))
    assert len(dataset) == 3
    first = dataset[0]["messages"]
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[0]["content"][0]["type"] == "image" and dataset[2]["messages"][0]["content"][0]["type"] == "image"
    batch = LeoMiniDataCollator(tiny_processor)([dataset[i] for i in range(3)])
    decode = tiny_processor.tokenizer.decode
    assert decode(batch["labels"][0][batch["labels"][0] != -100]) == "red<|im_end|>yes<|im_end|>"
    assert batch["pixel_values"].shape[0] == 2


@pytest.mark.parametrize("bad, match", [
    ({"id": "x", "image": "missing.png", "conversations": GOOD[0]["conversations"]}, "image not found"),
    ({"id": "x", "conversations": []}, "non-empty list"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "?"}]}, "malformed turn"),
    ({"id": "x", "conversations": [{"from": "human", "value": "only a question"}]}, "no assistant"),
    ({"id": "x", "conversations": [{"from": "human", "value": "<image> but no image"}, {"from": "gpt", "value": "?"}]},
     "placeholders"),
    ("not a record", "JSON object"),
])
def test_bad_records_are_named_or_skipped(tmp_path, bad, match):
    path = write_records(tmp_path, [GOOD[0], bad, GOOD[1]])
    with pytest.raises(ValueError, match=rf"record 1 \(id .*\): .*{match}"):
        LlavaConversationDataset(path)
    dataset = LlavaConversationDataset(path, skip_bad_records=True)
    assert len(dataset) == 2 and len(dataset.skipped) == 1 and dataset.skipped[0].index == 1


def test_easy_vqa_adapter():
    pytest.importorskip("easy_vqa")
    from leo_mini_hf.easyvqa.dataset import EasyVQADataset

    dataset = EasyVQADataset("test", limit=5)
    sample = dataset[0]
    assert len(dataset) == 5 and sample["messages"][1]["content"][0]["text"] == sample["answer"]
    assert Path(sample["messages"][0]["content"][0]["path"]).is_file()


# ---- stages -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["pretrain", "finetune", "full"])
def test_stages_set_requires_grad_exactly(tiny_checkpoint, stage):
    model = load(tiny_checkpoint, stage)
    parts = model.parameter_parts()
    for name, param in model.named_parameters():
        assert param.requires_grad == (parts[name] in STAGE_PARTS[stage]), name
    if stage == "finetune":
        assert not any(p.requires_grad for n, p in model.named_parameters() if "vision_experts" in n)
        assert not model.model.language_model.layers[0].mlp.down_proj.base_linear.weight.requires_grad
        assert model.model.language_model.layers[0].mlp.down_proj.experts_lora_A.requires_grad


def test_unknown_stage_raises(tiny_checkpoint):
    with pytest.raises(ValueError, match="Unknown stage"):
        apply_training_stage(load(tiny_checkpoint), "warmup")


# ---- training ---------------------------------------------------------------------------------------------------

def test_loss_decreases_and_frozen_parts_stay_identical(tiny_checkpoint, tiny_processor, tmp_path):
    model = load(tiny_checkpoint, "finetune")
    frozen = frozen_fingerprint(model)
    trainer = train(tiny_checkpoint, tiny_processor, tmp_path, overfit_set(), model=model, max_steps=30,
                    learning_rate=1e-2)
    trainer.train()
    losses = losses_of(trainer)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses  # the frozen random LLM limits how far
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, tensor in frozen.items():
        assert torch.equal(current[name], tensor), name
    aux = [log["aux_loss"] for log in trainer.state.log_history if "aux_loss" in log]
    assert len(aux) == 30 and all(0.5 < a < 3.0 for a in aux)  # about 1.0 when balanced, 3.0 when collapsed


def test_logits_to_keep_for_labels_covers_the_first_target():
    labels = torch.full((2, 10), -100)
    assert logits_to_keep_for_labels(labels) == 0  # nothing labelled: every position
    labels[0, 7:9] = 5
    labels[1, 4] = 6  # predicted by position 3: keep positions 3..9
    assert logits_to_keep_for_labels(labels) == 7
    labels[0, 0] = 5  # a target at position 0 has no predicting position
    assert logits_to_keep_for_labels(labels) == 7


def test_training_step_projects_only_labelled_positions_with_the_same_loss(tiny_checkpoint, tiny_processor,
                                                                           tmp_path):
    model = load(tiny_checkpoint, "finetune")
    trainer = train(tiny_checkpoint, tiny_processor, tmp_path, overfit_set(), model=model, max_steps=1)
    inputs = LeoMiniDataCollator(tiny_processor)(overfit_set()[:3])
    projected = []
    handle = model.lm_head.register_forward_hook(lambda module, args, output: projected.append(output.shape[1]))
    model.eval()
    with torch.no_grad():
        full = trainer.compute_loss(model, inputs)  # evaluation: every position
    model.train()
    with torch.no_grad():
        kept = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(7))
        full_sum = model(**inputs, num_items_in_batch=torch.tensor(7)).loss
    handle.remove()
    length = inputs["input_ids"].shape[1]
    assert projected == [length, logits_to_keep_for_labels(inputs["labels"]), length]
    assert projected[1] < length
    torch.testing.assert_close(kept, full_sum)
    torch.testing.assert_close(model(**inputs, logits_to_keep=projected[1]).loss, full)


def test_aux_loss_is_weighted_the_same_under_gradient_accumulation(tiny_checkpoint, tiny_processor, tmp_path):
    """Batch 4 in one step and batch 2 with 2 accumulation steps must take the same step, aux loss included.
    The samples are identical, so each micro-batch has the full batch's routing statistics; the coefficient is
    raised so that an aux loss counted once per micro-batch would show."""
    dataset = [colour_sample("red")] * 4
    weights = []
    for batch, accumulation in ((4, 1), (2, 2)):
        model = load(tiny_checkpoint, "finetune", mmoe_balance_loss_coef=50.0)
        with torch.no_grad():  # a router that is not balanced, so the aux loss has a gradient
            for name, param in model.named_parameters():
                if "lora_B" in name or "router" in name:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        trainer = train(tiny_checkpoint, tiny_processor, tmp_path / f"{batch}", dataset, model=model, max_steps=1,
                        per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        train_sampling_strategy="sequential", optim="sgd", learning_rate=1.0, max_grad_norm=0)
        trainer.train()
        weights.append({n: p.detach().clone() for n, p in model.named_parameters() if "router" in n})
    for name in weights[0]:
        torch.testing.assert_close(weights[0][name], weights[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_resume_reproduces_the_uninterrupted_loss_curve(tiny_checkpoint, tiny_processor, tmp_path):
    dataset = overfit_set()
    full = train(tiny_checkpoint, tiny_processor, tmp_path / "full", dataset, max_steps=8)
    full.train()
    first = train(tiny_checkpoint, tiny_processor, tmp_path / "resumed", dataset, max_steps=8, save_strategy="steps",
                  save_steps=4)
    first.train()
    assert (tmp_path / "resumed" / "checkpoint-4" / "modeling_leo_mini.py").exists()
    resumed = train(tiny_checkpoint, tiny_processor, tmp_path / "resumed", dataset, max_steps=8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    torch.testing.assert_close(torch.tensor(losses_of(resumed)[-4:]), torch.tensor(losses_of(full)[-4:]),
                               rtol=1e-4, atol=1e-4)
    reloaded = LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "resumed" / "checkpoint-8")
    assert reloaded.config.model_type == "leo_mini"


def test_activation_checkpointing_trains(tiny_checkpoint, tiny_processor, tmp_path):
    trainer = train(tiny_checkpoint, tiny_processor, tmp_path, overfit_set(1), max_steps=2,
                    activation_checkpointing=True)
    trainer.train()
    assert trainer.model.model.language_model.is_activation_checkpointing
    assert all(torch.isfinite(torch.tensor(losses_of(trainer))))


def test_train_command_end_to_end(tiny_checkpoint, tmp_path, capsys):
    records = [{"id": str(i), "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                   {"from": "gpt", "value": "red"}]} for i in range(8)]
    records.append({"id": "broken", "conversations": "nope"})
    data = write_records(tmp_path, records)
    out = tmp_path / "run"
    cli(["train", "--model", str(tiny_checkpoint), "--data", str(data), "--stage", "finetune", "--output_dir",
         str(out), "--max_steps", "3", "--per_device_train_batch_size", "4", "--logging_steps", "1",
         "--skip_bad_records", "--use_cpu", "--report_to", "none"])
    printed = capsys.readouterr().out
    assert "skipped 1 bad record(s)" in printed and "mmoe_routed_lora" in printed and "% trainable" in printed
    model = LeoMiniForConditionalGeneration.from_pretrained(out)
    assert (out / "modeling_leo_mini.py").exists() and (out / "processor_config.json").exists()
    assert not torch.equal(model.model.token_reducer.queries,
                           LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).model.token_reducer.queries)
    logged = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert sum("loss" in entry for entry in logged) == 3
    with Image.open(out / "loss_curve.png") as curve:  # drawn from those three losses
        assert curve.size == (640, 400) and (31, 119, 180) in {colour for _, colour in curve.getcolors(1 << 16)}
    assert "library_name: transformers" in (out / "README.md").read_text()  # the trained checkpoint has a card


def test_loss_curve_needs_two_losses(tmp_path):
    from leo_mini_hf.training.loss_curve import loss_points, write_loss_curve

    history = [{"loss": 2.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 3.0, "step": 1}, {"train_loss": 1.0}]
    assert loss_points(history) == [(1, 3.0), (2, 2.0)]
    assert write_loss_curve(history[:2], tmp_path / "one.png") is None and not (tmp_path / "one.png").exists()
    assert write_loss_curve(history, tmp_path / "two.png") == tmp_path / "two.png"


# ---- a quantized base (QLoRA-style) ---------------------------------------------------------------------------------

def quantized(checkpoint, bits: int, stage="finetune"):
    """The tiny checkpoint with a bitsandbytes base (its CLIP tower left out: bitsandbytes' CPU int8 matmul fails on
    the tiny tower's outlier columns, see test_quantization.py)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    skip = {"llm_int8_skip_modules": ["model.vision_experts", "lm_head"]}
    config = BitsAndBytesConfig(load_in_8bit=True, **skip) if bits == 8 else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", **skip)
    torch.manual_seed(0)
    model = LeoMiniForConditionalGeneration.from_pretrained(checkpoint, quantization_config=config, device_map="cpu")
    apply_training_stage(model, stage)
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_trains_leo_minis_own_parts_and_stays_frozen(tiny_checkpoint, tiny_processor, tmp_path, bits):
    from leo_mini_hf.modeling.mmoe import MMoELinear

    model = quantized(tiny_checkpoint, bits)
    base_linear = next(module for module in model.modules() if isinstance(module, MMoELinear)).base_linear
    assert type(base_linear).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    frozen = frozen_fingerprint(model)
    trainer = train(tiny_checkpoint, tiny_processor, tmp_path, overfit_set(1), model=model, max_steps=12,
                    report_to=[])
    trainer.train()
    losses = losses_of(trainer)
    assert losses[-1] < losses[0] - 0.2, losses
    after = frozen_fingerprint(model)
    assert all(torch.equal(after[name], tensor) for name, tensor in frozen.items())
    assert model.is_quantized  # the Trainer's check saw it as not quantized only while it was built


def test_a_quantized_base_refuses_to_train_its_quantized_parts(tiny_checkpoint, tiny_processor, tmp_path):
    with pytest.raises(ValueError, match=r"stage 'full' would train quantized weights .*train stage 'finetune'"):
        quantized(tiny_checkpoint, 4, stage="full")
    model = quantized(tiny_checkpoint, 4)
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no trainable parameters; .*apply_training_stage\(model, 'finetune'\)"):
        train(tiny_checkpoint, tiny_processor, tmp_path, overfit_set(1), model=model, max_steps=1)


def test_train_command_quantize_4bit_trains_on_a_4bit_base_and_saves_a_4bit_checkpoint(tiny_checkpoint, tmp_path,
                                                                                      monkeypatch):
    pytest.importorskip("bitsandbytes")
    from leo_mini_hf.modeling.mmoe import MMoELinear

    # On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a 4-bit weight for its CPU kernel in blocks of 64 input
    # features and fails on a narrower linear ("shape '[32, 0]' is invalid"): the tiny CLIP tower is 32 wide (real
    # towers are 384 or more). Take the path every other CPU takes.
    monkeypatch.setattr("bitsandbytes.nn.modules.has_avx512bf16", lambda: False)

    records = [{"id": str(i), "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                   {"from": "gpt", "value": "red"}]} for i in range(8)]
    out = tmp_path / "run"
    cli(["train", "--model", str(tiny_checkpoint), "--data", str(write_records(tmp_path, records)), "--output_dir",
         str(out), "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "--report_to", "none",
         "--quantize", "4bit"])
    trained = LeoMiniForConditionalGeneration.from_pretrained(out)
    assert trained.is_quantized
    assert type(next(m for m in trained.modules() if isinstance(m, MMoELinear)).base_linear).__name__ == "Linear4bit"
    assert not torch.equal(trained.model.token_reducer.queries,
                           LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).model.token_reducer.queries)


# ---- PEFT -------------------------------------------------------------------------------------------------------

def test_peft_lora_round_trip(tiny_checkpoint, tiny_processor, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from transformers import AutoModelForImageTextToText

    base = load(tiny_checkpoint, "finetune")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                 init_lora_weights=False))
    trainer = train(tiny_checkpoint, tiny_processor, tmp_path / "run", overfit_set(1), model=peft_model, max_steps=2)
    trainer.train()
    peft_model.save_pretrained(tmp_path / "adapter")
    batch = LeoMiniDataCollator(tiny_processor)(overfit_set(1)[:2])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits

    fresh_base = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    reloaded = PeftModel.from_pretrained(fresh_base, tmp_path / "adapter").eval()
    with torch.no_grad():
        # CoTR / MMoE weights trained alongside are not part of the PEFT adapter: copy them for the comparison
        reloaded.base_model.model.load_state_dict(
            {k: v for k, v in peft_model.base_model.model.state_dict().items() if "lora_" not in k.split(".")[-2]
             or "general_lora" in k or "experts_lora" in k}, strict=False)
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    assert type(merged).__name__ == "LeoMiniForConditionalGeneration"


def test_peft_all_linear_trains_and_merges_without_unloading_the_mmoe_layers(tiny_checkpoint, tiny_processor):
    from peft import LoraConfig, get_peft_model

    from leo_mini_hf.modeling.mmoe import MMoELinear

    peft_model = get_peft_model(load(tiny_checkpoint), LoraConfig(r=2, target_modules="all-linear",
                                                                  init_lora_weights=False))
    batch = LeoMiniDataCollator(tiny_processor)(overfit_set(1)[:2])
    peft_model(**batch).loss.backward()
    trained = {name for name, param in peft_model.named_parameters() if param.grad is not None}
    assert any(".down_proj.base_linear.lora_A." in name for name in trained)  # the MMoE layers' base linears
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(**inputs).logits
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    assert sum(isinstance(module, MMoELinear) for module in merged.modules()) == merged.config.text_config.num_hidden_layers


def test_llm_linear_names_adapt_the_llm_alone(tiny_checkpoint):
    from peft import LoraConfig, get_peft_model

    from leo_mini_hf.training import llm_linear_names

    model = load(tiny_checkpoint)
    names = llm_linear_names(model)
    layers = model.config.text_config.num_hidden_layers
    assert all(name.startswith("model.language_model.layers.") for name in names)
    assert sum(name.endswith(".mlp.down_proj.base_linear") for name in names) == layers
    assert sum(name.endswith(".self_attn.q_proj") for name in names) == layers  # not the CLIP expert's q_proj
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=names))
    adapted = {name.split(".lora_A.")[0].removeprefix("base_model.model.")
               for name, _ in peft_model.named_parameters() if ".lora_A." in name}
    assert adapted == set(names)


# ---- two processes ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_process_data_parallel_matches_single_process(tiny_checkpoint, tmp_path):
    script = TESTS / "helpers" / "ddp_train.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}

    def run(processes, per_device_batch, out):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(script), str(tiny_checkpoint), str(out),
                   str(per_device_batch), str(TESTS)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(processes)]

    two = run(2, 2, tmp_path / "two")
    one = run(1, 4, tmp_path / "one")
    assert [r["world_size"] for r in two] == [2, 2]
    assert two[0]["digest"] == two[1]["digest"], "ranks diverged"
    saved = LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "two")
    digest = hashlib.sha256()
    for _, param in sorted(saved.named_parameters()):
        digest.update(param.detach().numpy().tobytes())
    assert digest.hexdigest() == two[0]["digest"], "the saved model is not rank 0's"
    torch.testing.assert_close(torch.tensor(two[0]["losses"]), torch.tensor(one[0]["losses"]), rtol=1e-3, atol=1e-3)


def test_frozen_batch_norm_expert_stays_in_eval_mode(tiny_processor, tmp_path):
    """A frozen pretrained CNN must keep its running statistics: training may not put its batch norm in training
    mode (batch statistics would also wash out per-image colour)."""
    from helpers.tiny_parts import MOBILENET

    expert = {"config": MOBILENET, "image_size": 64, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    model = LeoMiniForConditionalGeneration(tiny_config_with(vision_experts=[expert]))
    apply_training_stage(model, "finetune")
    model.train()
    mobilenet = model.model.vision_experts[0]
    assert not mobilenet.training and not mobilenet.model.training
    assert model.model.token_reducer.training
    frozen = frozen_fingerprint(model)
    trainer = train(None, tiny_processor, tmp_path, overfit_set(1), model=model, max_steps=2)
    trainer.train()
    buffers = dict(model.named_buffers())
    assert any("running_mean" in name for name in buffers)
    for name, buffer in buffers.items():
        assert torch.equal(buffer, frozen[name]), name
    apply_training_stage(model, "full")
    model.train()
    assert mobilenet.training  # a trainable expert trains normally


# ---- nothing a user saved is overwritten; bad records are named -----------------------------------------------------

def train_command(model_dir, output_dir, data, *extra):
    return ["train", "--model", str(model_dir), "--data", str(data), "--output_dir", str(output_dir), "--max_steps",
            "1", "--per_device_train_batch_size", "2", "--use_cpu", "--report_to", "none", *extra]


def folder_state(folder):
    return {path.relative_to(folder): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_training_refuses_the_model_folder_and_a_non_empty_output_dir(tiny_checkpoint, tmp_path, capsys):
    records = [{"id": str(i), "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                   {"from": "gpt", "value": "red"}]} for i in range(4)]
    data = write_records(tmp_path, records)
    model_before = folder_state(tiny_checkpoint)
    with pytest.raises(SystemExit):
        cli(train_command(tiny_checkpoint, tiny_checkpoint, data, "--overwrite_output_dir"))
    assert "is the --model folder" in capsys.readouterr().err
    assert folder_state(tiny_checkpoint) == model_before
    unrelated = tmp_path / "my-notes"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        cli(train_command(tiny_checkpoint, unrelated, data))
    assert "is not empty" in capsys.readouterr().err
    assert [path.name for path in unrelated.iterdir()] == ["notes.txt"]
    cli(train_command(tiny_checkpoint, unrelated, data, "--overwrite_output_dir"))  # the user says so
    assert (unrelated / "notes.txt").read_text() == "keep me" and (unrelated / "model.safetensors").is_file()


@pytest.mark.parametrize("bad, match", [
    ({"id": "x", "conversations": [{"from": ["human"], "value": "?"}, {"from": "gpt", "value": "!"}]}, "malformed turn"),
    ({"id": "x", "image": 5, "conversations": GOOD[0]["conversations"]}, "'image' must be a path string"),
    ({"id": "x", "image": "corrupt.png", "conversations": GOOD[0]["conversations"]}, "is not a readable image"),
])
def test_records_of_the_wrong_type_or_with_a_corrupt_image_are_named_or_skipped(tmp_path, bad, match):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    path = write_records(tmp_path, [GOOD[0], bad, GOOD[1]])
    with pytest.raises(ValueError, match=rf"record 1 \(id x\): .*{match}"):
        LlavaConversationDataset(path)
    dataset = LlavaConversationDataset(path, skip_bad_records=True)
    assert len(dataset) == 2 and [skipped.record_id for skipped in dataset.skipped] == ["x"]


def test_an_image_that_breaks_at_training_time_names_its_record(tmp_path, tiny_processor):
    """A truncated file passes the header check; the collator's error then says which records the batch held."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    truncated = (tmp_path / "red.png").read_bytes()[:-40]
    (tmp_path / "truncated.png").write_bytes(truncated)
    record = {"id": "the-bad-one", "image": "truncated.png", "conversations": GOOD[0]["conversations"]}
    (tmp_path / "data.json").write_text(json.dumps([record]))
    dataset = LlavaConversationDataset(tmp_path / "data.json")
    with pytest.raises(ValueError, match=r"truncated.png.*in a batch of records \['the-bad-one'\]"):
        LeoMiniDataCollator(tiny_processor)([dataset[0]])


@pytest.mark.slow
def test_fsdp2_sharded_training_matches_one_process():
    """FSDP2 (`fully_shard` per decoder layer and on the whole model) over 2 CPU processes with gloo: the same losses
    and, after two SGD steps, the same parameters as one process on the whole batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(TESTS / "helpers" / "fsdp_train.py"), str(TESTS)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert report["world_size"] == 2 and report["sharded_parameter_type"] == "DTensor"
    torch.testing.assert_close(torch.tensor(report["sharded_losses"]), torch.tensor(report["losses"]),
                               rtol=1e-5, atol=1e-5)
    assert report["max_parameter_change"] > 1e-2  # the steps did train
    assert report["max_parameter_difference"] < 1e-5


@pytest.mark.slow
def test_fsdp_requested_on_cpu_warns_that_it_replicates(tiny_checkpoint, tmp_path):
    """The Trainer on CPU falls back to data parallelism when asked for FSDP; LeoMiniTrainer says so."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(TESTS / "helpers" / "ddp_train.py"), str(tiny_checkpoint),
               str(tmp_path), "2", str(TESTS), "fsdp"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FSDP was requested but accelerate runs MULTI_CPU" in result.stderr
    assert "replicates the model on every process instead of sharding it" in result.stderr


# ---- learning rates per part ------------------------------------------------------------------------------------

def part_rate_trainer(checkpoint, processor, output_dir, part_learning_rates=None, **arguments):
    defaults = {"output_dir": str(output_dir), "per_device_train_batch_size": 4, "learning_rate": 1e-3,
                "lr_scheduler_type": "constant", "optim": "sgd", "max_grad_norm": 0, "max_steps": 1,
                "save_strategy": "no", "seed": 0, "use_cpu": True, "train_sampling_strategy": "sequential"}
    return LeoMiniTrainer(model=load(checkpoint, "finetune"), args=default_training_arguments(**{**defaults,
                                                                                                  **arguments}),
                          train_dataset=overfit_set(4), data_collator=LeoMiniDataCollator(processor),
                          processing_class=processor, part_learning_rates=part_learning_rates)


def one_sgd_step(checkpoint, processor, output_dir, part_learning_rates=None, **arguments):
    trainer = part_rate_trainer(checkpoint, processor, output_dir, part_learning_rates, **arguments)
    model = trainer.model
    before = {name: param.detach().clone() for name, param in model.named_parameters() if param.requires_grad}
    trainer.train()
    steps = {name: param.detach() - before[name] for name, param in model.named_parameters() if name in before}
    return trainer, steps, model.parameter_parts()


def test_part_learning_rates_scale_exactly_that_parts_step(tiny_checkpoint, tiny_processor, tmp_path):
    # large rates: the random tiny model's gradients are ~1e-5, and a step must stand well above float32 rounding
    _, plain, parts = one_sgd_step(tiny_checkpoint, tiny_processor, tmp_path / "plain", learning_rate=10.0)
    trainer, faster, _ = one_sgd_step(tiny_checkpoint, tiny_processor, tmp_path / "faster",
                                      part_learning_rates={"token_reducer": 500.0}, learning_rate=10.0)
    reducer = [name for name in plain if parts[name] == "token_reducer"]
    assert reducer and len(reducer) < len(plain)
    for name in plain:  # plain SGD: the step is -lr x gradient, and the gradient is the same in both runs
        expected = plain[name] * (50.0 if parts[name] == "token_reducer" else 1.0)
        torch.testing.assert_close(faster[name], expected, rtol=1e-3, atol=1e-5, msg=name)
    assert any(faster[name].abs().max() > 100 * 1e-5 for name in reducer)  # compared far above the tolerance
    assert {(group["lr"], group["weight_decay"]) for group in trainer.optimizer.param_groups} == {(10.0, 0.0),
                                                                                                 (500.0, 0.0)}


def test_part_learning_rates_follow_the_schedule_and_survive_resume(tiny_checkpoint, tiny_processor, tmp_path):
    arguments = {"max_steps": 4, "lr_scheduler_type": "linear", "optim": "adamw_torch", "weight_decay": 0.1}
    full, _, _ = one_sgd_step(tiny_checkpoint, tiny_processor, tmp_path / "full", {"projector": 4e-3}, **arguments)
    assert sorted({group["weight_decay"] for group in full.optimizer.param_groups}) == [0.0, 0.1]
    ratios = {group["lr"] / group["initial_lr"] for group in full.optimizer.param_groups}
    assert len(ratios) == 1  # every group on the same schedule, scaled from its own rate
    assert sorted({group["initial_lr"] for group in full.optimizer.param_groups}) == [1e-3, 4e-3]
    first, _, _ = one_sgd_step(tiny_checkpoint, tiny_processor, tmp_path / "resumed", {"projector": 4e-3},
                               **{**arguments, "save_strategy": "steps", "save_steps": 2})
    assert (tmp_path / "resumed" / "checkpoint-2").is_dir() and first.state.global_step == 4
    resumed = part_rate_trainer(tiny_checkpoint, tiny_processor, tmp_path / "resumed", {"projector": 4e-3},
                                **arguments)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    for name, param in resumed.model.named_parameters():
        torch.testing.assert_close(param, dict(full.model.named_parameters())[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


@pytest.mark.parametrize("rates, error, match", [
    ({"cotr": 1e-3}, ValueError, "not a model part"),
    ({"token_reducer": 0.0}, ValueError, "positive number"),
    ({"token_reducer": "fast"}, ValueError, "positive number"),
    ([("token_reducer", 1e-3)], TypeError, "must be a dict"),
])
def test_bad_part_learning_rates_are_named(tiny_checkpoint, tiny_processor, tmp_path, rates, error, match):
    with pytest.raises(error, match=match):
        one_sgd_step(tiny_checkpoint, tiny_processor, tmp_path, rates)


def test_train_command_takes_part_learning_rates(tiny_checkpoint, tmp_path, capsys):
    from leo_mini_hf.training.run import parse_part_learning_rates

    assert parse_part_learning_rates("token_reducer=3e-3, projector=1e-4") == {"token_reducer": 3e-3,
                                                                                "projector": 1e-4}
    with pytest.raises(ValueError, match="part=rate"):
        parse_part_learning_rates("token_reducer:3e-3")
    records = [{"id": str(i), "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                   {"from": "gpt", "value": "red"}]} for i in range(2)]
    data = write_records(tmp_path, records)
    with pytest.raises(SystemExit):  # frozen in the finetune stage
        cli(train_command(tiny_checkpoint, tmp_path / "frozen", data, "--part_learning_rates", "vision_experts=1e-3"))
    assert "no trained parameters in this model and stage" in capsys.readouterr().err
    def weights(model):
        return {"token_reducer": model.model.token_reducer.queries.detach(),
                "multi_modal_projector": model.model.multi_modal_projector.linear_1.weight.detach()}

    start = weights(LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint))
    steps = {}
    for name, extra in (("plain", ()), ("fast", ("--part_learning_rates", "token_reducer=0.1"))):
        cli(train_command(tiny_checkpoint, tmp_path / name, data, "--seed", "0", *extra))
        trained = weights(LeoMiniForConditionalGeneration.from_pretrained(tmp_path / name))
        steps[name] = {part: float((trained[part] - start[part]).abs().max()) for part in start}
    # one AdamW step moves each weight by about its learning rate: 0.1 for CoTR's queries, 5e-5 (default) elsewhere
    assert steps["fast"]["token_reducer"] > 100 * steps["plain"]["token_reducer"]
    assert steps["fast"]["multi_modal_projector"] == pytest.approx(steps["plain"]["multi_modal_projector"], rel=1e-3)


def test_part_learning_rates_refuse_a_wrapped_model(tiny_checkpoint, tiny_processor, tmp_path):
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(load(tiny_checkpoint), LoraConfig(r=2, target_modules=r".*language_model.*\.q_proj"))
    trainer = LeoMiniTrainer(model=wrapped, args=default_training_arguments(output_dir=str(tmp_path), max_steps=1,
                                                                            use_cpu=True),
                             train_dataset=overfit_set(1), data_collator=LeoMiniDataCollator(tiny_processor),
                             processing_class=tiny_processor, part_learning_rates={"projector": 1e-3})
    with pytest.raises(ValueError, match="needs the LEO-MINI model itself"):
        trainer.train()


def truncated_png(folder: Path, name: str = "truncated.png") -> str:
    Image.new("RGB", (64, 64), "red").save(folder / "whole.png")
    (folder / name).write_bytes((folder / "whole.png").read_bytes()[:-40])
    return name


@pytest.mark.parametrize("truncated_images_allowed", [False, True], ids=["PIL default", "lmms-eval imported"])
def test_skip_bad_records_skips_a_truncated_image(tmp_path, capsys, tiny_checkpoint, monkeypatch,
                                                  truncated_images_allowed):
    """Skipping decodes each image once: a truncated file is skipped and counted like any bad record, and training
    runs on the rest (it stopped at step 0 before), also after a library allowed truncated images globally."""
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", truncated_images_allowed)
    bad = {"id": "cut", "image": truncated_png(tmp_path), "conversations": GOOD[0]["conversations"]}
    path = write_records(tmp_path, [GOOD[0], bad, GOOD[2]])
    dataset = LlavaConversationDataset(path, skip_bad_records=True)
    assert len(dataset) == 2 and [skipped.record_id for skipped in dataset.skipped] == ["cut"]
    assert "is not a readable image" in dataset.skipped[0].reason
    cli(train_command(tiny_checkpoint, tmp_path / "run", path, "--skip_bad_records"))
    assert "skipped 1 bad record(s)" in capsys.readouterr().out
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_training_on_no_records_is_refused_and_a_failed_run_leaves_no_folder(tmp_path, capsys, tiny_checkpoint):
    path = write_records(tmp_path, [])
    with pytest.raises(ValueError, match="holds no record to train on"):
        LlavaConversationDataset(path)
    (tmp_path / "only-bad").mkdir()
    only_bad = write_records(tmp_path / "only-bad", [{"id": "x", "conversations": []}])
    with pytest.raises(ValueError, match=r"no record to train on: all 1 were skipped"):
        LlavaConversationDataset(only_bad, skip_bad_records=True)
    with pytest.raises(SystemExit):
        cli(train_command(tiny_checkpoint, tmp_path / "empty-run", path))
    assert "holds no record to train on" in capsys.readouterr().err
    assert not (tmp_path / "empty-run").exists()
    # a run that fails once the Trainer has made its folder (a truncated image, not skipped) removes it too
    (tmp_path / "cut").mkdir()
    cut = write_records(tmp_path / "cut", [{"id": "cut", "image": truncated_png(tmp_path / "cut"), "conversations":
                                            GOOD[0]["conversations"]}] * 2)
    with pytest.raises(SystemExit):
        cli(train_command(tiny_checkpoint, tmp_path / "failed-run", cut))
    assert not (tmp_path / "failed-run").exists()


def test_resume_passes_over_a_checkpoint_cut_short(tmp_path, capsys, tiny_checkpoint):
    data = write_records(tmp_path, GOOD)
    out = tmp_path / "run"
    cli(train_command(tiny_checkpoint, out, data, "--save_steps", "1") + ["--max_steps", "2"])
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    for requested in (str(out / "checkpoint-2"), "last"):
        (out / "checkpoint-2" / "trainer_state.json").unlink()  # killed while saving checkpoint-2
        (out / "checkpoint-2" / "model.safetensors").write_bytes(b"cut")
        cli(train_command(tiny_checkpoint, out, data, "--resume_from_checkpoint", requested, "--overwrite_output_dir")
            + ["--max_steps", "3"])
        printed = capsys.readouterr().out
        assert f"skipping {out / 'checkpoint-2'}: its save was interrupted" in printed
        state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        assert state["global_step"] == 3
        (out / "checkpoint-3").rename(tmp_path / f"resumed-from-{len(requested)}")


def test_a_final_save_cut_short_is_refused_on_load(tmp_path, monkeypatch, tiny_checkpoint):
    from leo_mini_hf.training import run

    data = write_records(tmp_path, GOOD)
    cli(train_command(tiny_checkpoint, tmp_path / "whole", data))
    assert not list((tmp_path / "whole").glob(".leo-mini-incomplete"))
    LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "whole")

    def killed(folder):
        raise KeyboardInterrupt  # the process stops after the weights, before the remote code
    monkeypatch.setattr(run, "add_remote_code", killed)
    with pytest.raises(KeyboardInterrupt):
        cli(train_command(tiny_checkpoint, tmp_path / "cut", data))
    assert (tmp_path / "cut" / "model.safetensors").is_file()
    with pytest.raises(ValueError, match="was not completely written"):
        LeoMiniForConditionalGeneration.from_pretrained(tmp_path / "cut")


def test_the_training_package_exports_its_public_names():
    import leo_mini_hf.training as training
    from leo_mini_hf.training import LeoMiniDataCollator as Collator, LeoMiniTrainer as Trainer  # the README's import

    assert Trainer is LeoMiniTrainer and Collator is LeoMiniDataCollator
    assert all(getattr(training, name) is not None for name in training.__all__)
    with pytest.raises(ImportError):
        from leo_mini_hf.training import LeoMiniCollator  # noqa: F401  (not a name of ours)
