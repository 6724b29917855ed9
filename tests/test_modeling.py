"""LeoMiniForConditionalGeneration end to end: shapes, training signal, save/load, generation, bad input."""

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from helpers.tiny_models import image_prompt, random_pixels, tiny_config, tiny_model
from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration, LeoMiniModel
from leo_mini_hf.training.stages import apply_training_stage


def test_shapes_through_every_stage(model):
    config = model.config
    pixels = random_pixels(config, num_images=2)
    experts = model.model.vision_experts
    expert_features = [expert(pixels) for expert in experts]
    assert [tuple(f.shape) for f in expert_features] == [(2, 16, 32), (2, 4, 40)]  # CLIP 4x4 (CLS dropped), ConvNeXt 2x2
    assert [(e.num_tokens, e.hidden_size) for e in experts] == [(16, 32), (4, 40)]
    reduced = model.model.token_reducer(expert_features, torch.zeros(2, config.text_config.hidden_size))
    assert reduced.shape == (2, config.num_visual_tokens, 32 + 40)
    projected = model.get_image_features(pixels)
    assert projected.shape == (2, config.num_visual_tokens, config.text_config.hidden_size)

    prompt = image_prompt(config, num_images=2)
    output = model(input_ids=torch.tensor([prompt]), pixel_values=pixels, output_router_logits=True)
    assert output.logits.shape == (1, len(prompt), config.text_config.vocab_size)
    assert output.image_hidden_states.shape == (2, config.num_visual_tokens, config.text_config.hidden_size)
    assert output.routing_context.shape == (1, 2 * config.text_config.hidden_size)
    assert output.aux_loss.ndim == 0


def test_visual_tokens_land_on_image_positions(model):
    config = model.config
    prompt = image_prompt(config)
    hooked = {}
    handle = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: hooked.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    output = model(input_ids=torch.tensor([prompt]), pixel_values=random_pixels(config))
    handle.remove()
    positions = [i for i, token in enumerate(prompt) if token == config.image_token_id]
    torch.testing.assert_close(hooked["embeds"][0, positions], output.image_hidden_states[0])


def test_text_only_input_works(model):
    output = model(input_ids=torch.tensor([[1, 10, 11, 12]]), labels=torch.tensor([[1, 10, 11, 12]]))
    assert output.image_hidden_states is None
    assert torch.isfinite(output.loss)
    generated = model.generate(input_ids=torch.tensor([[1, 10, 11]]), max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 6)


def test_gradients_reach_trainable_parts_only():
    model = tiny_model().train()
    apply_training_stage(model, "finetune")  # the paper's stage 3: vision experts and the LLM's own weights frozen
    config = model.config
    prompt = image_prompt(config)
    input_ids = torch.tensor([prompt + [20, 21, 2]])
    labels = torch.full_like(input_ids, -100)
    labels[0, len(prompt):] = input_ids[0, len(prompt):]
    model(input_ids=input_ids, pixel_values=random_pixels(config), labels=labels).loss.backward()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    trainable = {name.split(".")[1] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"token_reducer", "multi_modal_projector", "mmoe_router_context", "language_model"}


def test_aux_loss_is_added_and_scaled_by_micro_batch_share():
    model = tiny_model()
    config = model.config
    input_ids = torch.tensor([image_prompt(config) + [20, 21, 2]])
    labels = input_ids.clone()
    labels[0, :-3] = -100
    pixels = random_pixels(config)
    plain = model(input_ids=input_ids, pixel_values=pixels, labels=labels)
    lm_loss = plain.loss - config.mmoe_balance_loss_coef * plain.aux_loss
    lm_loss_sum = lm_loss * 3  # the plain loss is the mean over the 3 answer tokens
    accumulated = model(input_ids=input_ids, pixel_values=pixels, labels=labels, num_items_in_batch=6)
    # this micro-batch holds 3 of the 6 label tokens of the accumulated batch: half of each loss
    expected = lm_loss_sum / 6 + config.mmoe_balance_loss_coef * plain.aux_loss * 3 / 6
    torch.testing.assert_close(accumulated.loss, expected)


def test_activation_checkpointing_gives_the_same_gradients():
    config = tiny_config()
    prompt = image_prompt(config)
    input_ids = torch.tensor([prompt + [20, 21, 2]])
    labels = input_ids.clone()
    grads = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(input_ids=input_ids, pixel_values=random_pixels(config), labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_keeps_a_users_context_fn_and_refuses_reentrant():
    """Recomputed MMoE layers need their forward's routing, which only torch's non-reentrant checkpoint can restore:
    a reentrant request is refused by name; a user's own `context_fn` still runs, in the forward and the
    recomputation."""
    import contextlib

    config = tiny_config()
    input_ids = torch.tensor([image_prompt(config) + [20, 21, 2]])
    with pytest.raises(ValueError, match="use_reentrant=False"):
        tiny_model().activation_checkpointing_enable({"use_reentrant": True})
    entered = []

    @contextlib.contextmanager
    def record(phase):
        entered.append(phase)
        yield

    model = tiny_model().train()
    model.activation_checkpointing_enable({"context_fn": lambda: (record("forward"), record("recompute"))})
    model(input_ids=input_ids, pixel_values=random_pixels(config), labels=input_ids).loss.backward()
    layers = config.text_config.num_hidden_layers  # the CLIP expert's layers are checkpointed too
    assert entered.count("forward") >= entered.count("recompute") >= layers


def test_save_and_load_round_trip(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    reloaded = LeoMiniForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    config = model.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config)}
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=0)


def test_auto_classes_are_registered(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is LeoMiniConfig
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is LeoMiniForConditionalGeneration
    assert type(AutoModel.from_pretrained(tmp_path)) is LeoMiniModel
    assert type(AutoModelForImageTextToText.from_config(model.config)) is LeoMiniForConditionalGeneration


def test_tied_embeddings_follow_the_text_config():
    text_config = dict(tiny_config().text_config.to_dict(), tie_word_embeddings=True)
    model = LeoMiniForConditionalGeneration(tiny_config(text_config=text_config))
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


# ---- generation ------------------------------------------------------------------------------------------------

def test_greedy_with_and_without_cache_agree(model):
    config = model.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config)}
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_kv_cache_under_either_name_gives_the_same_step(model):
    """transformers 5.24 renamed `past_key_values` → `cache`: both names reach the LLM; the output carries the cache
    under the installed version's name."""
    from leo_mini_hf.modeling.modeling_leo_mini import CACHE_NAME as cache_name

    config = model.config
    prompt, pixels, next_token = torch.tensor([image_prompt(config)]), random_pixels(config), torch.tensor([[17]])
    steps = {}
    for name in ("cache", "past_key_values"):
        prefill = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
        # reference without a cache: the whole sequence with the prefill's visual tokens and routing context
        full = model(input_ids=torch.cat([prompt, next_token], dim=1), image_features=prefill.image_hidden_states,
                     routing_context=prefill.routing_context).logits[:, -1]
        assert getattr(prefill, cache_name) is not None
        step = model(input_ids=next_token, use_cache=True, routing_context=prefill.routing_context,
                     **{name: getattr(prefill, cache_name)})
        assert getattr(step, cache_name).get_seq_length() == prompt.shape[1] + 1
        steps[name] = step.logits[:, -1]
        torch.testing.assert_close(steps[name], full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(steps["cache"], steps["past_key_values"])
    prefill = model(input_ids=prompt, pixel_values=pixels, use_cache=True)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=next_token, cache=getattr(prefill, cache_name), past_key_values=getattr(prefill, cache_name))


def test_vision_runs_once_per_generate(model):
    config = model.config
    calls = []
    handle = model.model.vision_experts[0].register_forward_hook(lambda *args: calls.append(1))
    model.generate(input_ids=torch.tensor([image_prompt(config)]), pixel_values=random_pixels(config),
                   max_new_tokens=5, do_sample=False)
    handle.remove()
    assert len(calls) == 1


def test_left_padded_batch_matches_single_prompts(model):
    config = model.config
    prompts = [image_prompt(config, text_after=(12, 13, 14, 15, 16)), image_prompt(config, text_after=(40,))]
    pixels = random_pixels(config, num_images=2)
    singles = [
        model.generate(input_ids=torch.tensor([p]), pixel_values=pixels[i:i + 1], max_new_tokens=6, do_sample=False)
        [0, len(p):].tolist()
        for i, p in enumerate(prompts)
    ]
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                             max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert batched[:, width:].tolist() == singles


def test_beam_search_and_multiple_return_sequences(model):
    config = model.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)] * 2), "pixel_values": random_pixels(config, 2)}
    beams = model.generate(**inputs, max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    assert beams.shape == (4, inputs["input_ids"].shape[1] + 4)
    best = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert beams[::2].tolist() == best.tolist()
    sampled = model.generate(**inputs, max_new_tokens=4, do_sample=True, num_return_sequences=3)
    assert sampled.shape[0] == 6


# ---- bad input ---------------------------------------------------------------------------------------------------

def test_image_token_count_mismatch_raises(model):
    config = model.config
    short = image_prompt(config)[:-4]  # cuts one image token
    with pytest.raises(ValueError, match="Image tokens and images do not match"):
        model(input_ids=torch.tensor([short]), pixel_values=random_pixels(config))
    with pytest.raises(ValueError, match="Image tokens and images do not match"):
        model(input_ids=torch.tensor([image_prompt(config)]), pixel_values=random_pixels(config, num_images=2))
    # right total (2 images), but row 0 holds 1.5 image blocks and row 1 holds half a block
    image, half = config.image_token_id, config.num_image_tokens // 2
    rows = [[1, 10] + [image] * (3 * half) + [12] * half, [1, 10] + [12] * half + [image] * half + [12] * 2 * half]
    with pytest.raises(ValueError, match=r"\[6, 2\] image tokens per row"):
        model(input_ids=torch.tensor(rows), pixel_values=random_pixels(config, num_images=2))


@pytest.mark.parametrize(
    "pixels, error, match",
    [
        (torch.randn(1, 3, 32, 32), ValueError, r"pixel_values must have shape \(n_images, 3, 64, 64\)"),
        (torch.randn(3, 64, 64), ValueError, "pixel_values must have shape"),
        (torch.randn(1, 4, 64, 64), ValueError, "pixel_values must have shape"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), ValueError, "floating-point"),
        ([[0.0]], TypeError, "torch.Tensor"),
    ],
)
def test_bad_pixel_values_raise(model, pixels, error, match):
    with pytest.raises(error, match=match):
        model(input_ids=torch.tensor([image_prompt(model.config)]), pixel_values=pixels)


def test_out_of_vocabulary_ids_raise(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(input_ids=torch.tensor([[1, 10, model.config.text_config.vocab_size]]))


def test_image_token_id_outside_vocab_raises():
    with pytest.raises(ValueError, match="image_token_id"):
        tiny_config(image_token_id=10_000)


def test_beam_search_keeps_each_prompts_images_together(model):
    config = model.config
    prompts = [image_prompt(config, num_images=2), image_prompt(config, text_after=(12, 13, 14) + (15,) * 4)]
    assert len(prompts[0]) == len(prompts[1])
    pixels = random_pixels(config, num_images=3)
    expected = model(input_ids=torch.tensor(prompts), pixel_values=pixels).logits[:, -1]  # (2, V)
    beams = model.generate(input_ids=torch.tensor(prompts), pixel_values=pixels, max_new_tokens=1, num_beams=2,
                           do_sample=False, output_logits=True, return_dict_in_generate=True)
    first_step = beams.logits[0]  # (2 prompts x 2 beams, V)
    torch.testing.assert_close(first_step, expected.repeat_interleave(2, dim=0), rtol=1e-5, atol=1e-5)


def test_non_finite_pixels_are_refused(model):
    config = model.config
    for value in (float("nan"), float("inf")):
        pixels = random_pixels(config)
        pixels[0, 1, 2, 3] = value
        with pytest.raises(ValueError, match="NaN or infinite"):
            model(input_ids=torch.tensor([image_prompt(config)]), pixel_values=pixels)


def test_pixels_that_overflow_after_the_cast_are_refused(model):
    """1e5 is finite in float32 but infinite in a float16 tower: checked after the cast, not before."""
    half = tiny_model().to(torch.float16)
    pixels = random_pixels(half.config)
    pixels[0, 0, 0, 0] = 1e5
    with pytest.raises(ValueError, match="overflow the vision experts' torch.float16"):
        half(input_ids=torch.tensor([image_prompt(half.config)]), pixel_values=pixels)


def test_nan_logits_at_prefill_name_the_likely_cause(model):
    """Finite inputs that overflow (1e30) or damaged weights give NaN logits: an error naming the cause at prefill,
    never `generate` answering token 0 over and over."""
    config = model.config
    prompt = torch.tensor([image_prompt(config)])
    pixels = random_pixels(config)
    pixels[0, 0, 0, 0] = 1e30
    with pytest.raises(ValueError, match="visual tokens overflowed.*LeoMiniImageProcessor.*1e\\+30"):
        model.generate(input_ids=prompt, pixel_values=pixels, max_new_tokens=3)
    damaged = tiny_model()
    with torch.no_grad():
        damaged.model.language_model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 weight tensors do .*layers.0.mlp.up_proj.*damaged"):
        damaged.generate(input_ids=prompt, pixel_values=random_pixels(config), max_new_tokens=3)


def test_meta_pixel_values_are_refused(model):
    size = model.config.image_size
    with pytest.raises(ValueError, match="pixel_values are on the meta device"):
        model(input_ids=torch.tensor([image_prompt(model.config)]), pixel_values=torch.empty(1, 3, size, size,
                                                                                           device="meta"))


def test_image_tokens_without_images_are_refused(model):
    with pytest.raises(ValueError, match="hold image tokens .* but no pixel_values"):
        model(input_ids=torch.tensor([image_prompt(model.config)]))
    with pytest.raises(ValueError, match="hold image tokens"):
        model.generate(input_ids=torch.tensor([image_prompt(model.config)]), max_new_tokens=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_pixels_of_any_float_dtype_are_cast_to_the_model(model, dtype):
    config = model.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)])}
    reference = model(**inputs, pixel_values=random_pixels(config)).logits
    cast = model(**inputs, pixel_values=random_pixels(config).to(dtype)).logits
    torch.testing.assert_close(cast, reference, rtol=0.05, atol=0.05)


def test_half_precision_model_takes_the_processors_float32_pixels():
    model = tiny_model().to(torch.bfloat16)
    config = model.config
    out = model.generate(input_ids=torch.tensor([image_prompt(config)]), pixel_values=random_pixels(config),
                         max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(image_prompt(config)) + 3


@pytest.mark.parametrize("inputs, error, match", [
    ({"input_ids": torch.tensor([1, 10, 11])}, ValueError, r"shape \(batch, tokens\)"),
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, r"shape \(batch, tokens\) with both > 0"),
    ({"input_ids": torch.tensor([[1.0, 10.0]])}, TypeError, "integer torch.Tensor"),
    ({"input_ids": torch.tensor([[1, 10, 11]]), "attention_mask": torch.ones(1, 5)}, ValueError,
     r"attention_mask has shape \(1, 5\); expected \(1, 3\)"),
    ({"input_ids": torch.tensor([[1, 10, 11]]), "labels": torch.tensor([[1, 10]])}, ValueError,
     r"labels have shape \(1, 2\); expected \(1, 3\)"),
    ({"inputs_embeds": torch.randn(1, 3, 5)}, ValueError, r"inputs_embeds must have shape \(batch, tokens, 64\)"),
])
def test_malformed_text_inputs_say_what_is_wrong(model, inputs, error, match):
    with pytest.raises(error, match=match):
        model(**inputs)


def test_empty_pixel_values_are_refused(model):
    with pytest.raises(ValueError, match="n_images > 0"):
        model(input_ids=torch.tensor([[1, 10, 11]]), pixel_values=torch.zeros(0, 3, 64, 64))


# ---- attention implementation and dtype (what users pass to from_pretrained) ----------------------------------------

def test_attention_implementation_reaches_the_llm_and_every_vision_tower(tiny_checkpoint):
    models = {}
    for implementation in ("eager", "sdpa"):
        model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=implementation)
        assert model.model.language_model.config._attn_implementation == implementation
        clip, convnext = model.model.vision_experts
        assert clip.model.config._attn_implementation == implementation
        assert convnext.model.config._attn_implementation == "eager"  # a CNN has no attention to switch
        models[implementation] = model.eval()
    config = models["eager"].config
    inputs = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config)}
    torch.testing.assert_close(models["eager"](**inputs).logits, models["sdpa"](**inputs).logits,
                               rtol=1e-4, atol=1e-4)
    attentions = models["eager"](**inputs, output_attentions=True).attentions
    assert len(attentions) == config.text_config.num_hidden_layers
    assert attentions[0].shape[-1] == inputs["input_ids"].shape[1]
    with pytest.raises(ImportError, match="FlashAttention2"):
        LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoint_generates_from_the_processors_outputs(tiny_checkpoint, tiny_processor, dtype):
    from PIL import Image
    from transformers import pipeline

    model = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype=dtype).eval()
    # float16 keeps LEO-MINI's own small modules (`trained_module_patterns`) in float32; bfloat16 needs no such care
    kept = torch.float32 if dtype == torch.float16 else dtype
    layer = model.model.language_model.layers[0]
    down_proj = layer.mlp.down_proj  # an MMoE layer: base linear, adapters and router
    assert model.dtype == dtype and layer.mlp.up_proj.weight.dtype == dtype
    assert down_proj.base_linear.weight.dtype == dtype  # the base linear is the LLM's, cast like its others
    assert {model.model.token_reducer.queries.dtype, model.model.multi_modal_projector.linear_1.weight.dtype,
            model.model.mmoe_router_context.weight.dtype, down_proj.router.hidden_proj.weight.dtype,
            down_proj.general_lora_A.dtype,
            down_proj.experts_lora_B.dtype} == {kept}
    image = Image.new("RGB", (40, 30), "red")
    inputs = tiny_processor(images=image, text="<image> What colour?", return_tensors="pt")
    assert inputs["pixel_values"].dtype == torch.float32
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 3
    pipe = pipeline("image-text-to-text", model=model, processor=tiny_processor)
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    assert isinstance(pipe(text=chat, max_new_tokens=2)[0]["generated_text"], list)


@pytest.mark.parametrize("cpu_memory", ["300KB", "700KB"])
def test_device_map_auto_with_disk_offload_generates_the_same_tokens(tiny_checkpoint, tmp_path, cpu_memory):
    """With max_memory forcing the LLM (all of it, or its layers) and the rest onto disk, generation is unchanged."""
    plain = LeoMiniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    config = plain.config
    inputs = {"input_ids": torch.tensor([image_prompt(config)]), "pixel_values": random_pixels(config)}
    expected = plain.generate(**inputs, max_new_tokens=6, do_sample=False)
    offloaded = LeoMiniForConditionalGeneration.from_pretrained(
        tiny_checkpoint, device_map="auto", max_memory={"cpu": cpu_memory}, offload_folder=str(tmp_path)).eval()
    assert "disk" in offloaded.hf_device_map.values()
    assert any(key.startswith("model.language_model") and device == "disk"
               for key, device in offloaded.hf_device_map.items())
    assert offloaded.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == expected.tolist()


def test_a_cached_decoding_step_compiles_without_graph_breaks(model):
    """What `torch.compile` (and transformers' compiled decoding on accelerators) sees after the prefill: one graph.
    MMoE's routing, the carried routing context and the cache-name shim must not break it."""
    from leo_mini_hf.modeling.modeling_leo_mini import CACHE_NAME

    config = model.config
    prefill = model(input_ids=torch.tensor([image_prompt(config)]), pixel_values=random_pixels(config), use_cache=True)
    step = {"input_ids": torch.tensor([[17]]), "routing_context": prefill.routing_context, "use_cache": True,
            CACHE_NAME: getattr(prefill, CACHE_NAME)}
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**step)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]
    assert explanation.graph_count == 1
