"""GGUF causal LM → a plain transformers folder (dequantised safetensors + tokenizer)."""

from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from ..folders import require_path


def convert_gguf_llm(gguf_path, out) -> Path:
    """Dequantise a GGUF LLM with transformers' own GGUF loader and save it as float32 safetensors.

    Needs the `gguf` package. The weights are the dequantised 4/8-bit values: fine for demos and training,
    not a quality claim about the original full-precision model.
    """
    gguf_path = require_path(gguf_path, "GGUF", kind="file")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The GGUF loader marks the model quantised; it is already dequantised, so save it as a plain model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
