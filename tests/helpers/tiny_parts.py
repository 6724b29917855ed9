"""Tiny pretrained-part folders made in code: a GGUF LLM, a causal LM folder, vision model folders, a LLaVA."""

from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoConfig, LlavaConfig, LlavaForConditionalGeneration

from leo_mini_hf.conversion.tiny_tokenizer import build_tiny_tokenizer
from leo_mini_hf.presets import tiny

CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
MOBILENET = {"model_type": "mobilenet_v2", "depth_multiplier": 0.35, "image_size": 64, "tf_padding": False}


def write_tiny_gguf(path: Path, vocab_size=300, hidden=32, ffn=64, layers=2, heads=4, kv_heads=2) -> Path:
    """A float32 llama GGUF with a byte-level BPE vocabulary, written with the `gguf` package."""
    import gguf
    from tokenizers.pre_tokenizers import ByteLevel

    rng = np.random.RandomState(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(vocab_size)
    alphabet = sorted(ByteLevel.alphabet())
    tokens, merges = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet], []
    step = 0
    while len(tokens) < vocab_size:
        left, right = alphabet[step % 256], alphabet[(7 * step + 1) % 256]
        step += 1
        if left + right not in tokens:
            tokens.append(left + right)
            merges.append(f"{left} {right}")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name, *shape):
        writer.add_tensor(name, (rng.randn(*shape) * 0.05).astype(np.float32))

    tensor("token_embd.weight", vocab_size, hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", vocab_size, hidden)
    kv_width = kv_heads * hidden // heads
    for i in range(layers):
        for name, shape in [("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)),
                            ("attn_k", (kv_width, hidden)), ("attn_v", (kv_width, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))]:
            tensor(f"blk.{i}.{name}.weight", *shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llm(folder: Path, tie_word_embeddings: bool = False) -> Path:
    """A random llama causal LM folder with the tiny tokenizer (which already holds `<image>`)."""
    text_config = dict(tiny()["text_config"], tie_word_embeddings=tie_word_embeddings)
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**text_config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_moe_text_config() -> dict:
    """A mixture-of-experts LLM config (GraniteMoE) whose layers hold `router` modules of their own."""
    return {"model_type": "granitemoe", "vocab_size": tiny()["text_config"]["vocab_size"], "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_local_experts": 2, "num_experts_per_tok": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False}


def write_tiny_moe_llm(folder: Path, drop_routers: bool = False) -> Path:
    """A random GraniteMoE causal LM folder with the tiny tokenizer; `drop_routers` leaves its router weights out of
    the saved file (a broken checkpoint)."""
    from safetensors.torch import save_file

    torch.manual_seed(4)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_moe_text_config()))
    model.save_pretrained(folder)
    if drop_routers:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if ".router." not in k}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


def write_tiny_vision_model(folder: Path, config: dict, seed: int = 2) -> Path:
    torch.manual_seed(seed)
    config = dict(config)
    AutoModel.from_config(AutoConfig.for_model(config.pop("model_type"), **config)).save_pretrained(folder)
    return folder


def tiny_llava(feature_layer=-2, strategy="default", projector_bias=True) -> LlavaForConditionalGeneration:
    config = LlavaConfig(text_config=tiny()["text_config"], vision_config=CLIP_VISION, image_token_id=4,
                         vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                         multimodal_projector_bias=projector_bias, image_seq_length=16)
    torch.manual_seed(3)
    return LlavaForConditionalGeneration(config).eval()
