"""Checkpoint builders."""

from pathlib import Path

import torch

from ..hub.checkpoint_folder import save_for_hub
from ..modeling import LeoMiniForConditionalGeneration
from ..presets import preset_config
from ..processor import LeoMiniProcessor
from .tiny_tokenizer import build_tiny_tokenizer


def build_random_checkpoint(preset: str, out, seed: int = 0, **overrides) -> Path:
    """A complete, loadable checkpoint with random weights: config, safetensors, processor, tokenizer, chat
    template, remote code. Offline and in seconds for `tiny`."""
    if preset != "tiny":
        raise ValueError(f"--random-init builds only the 'tiny' preset (it has an offline tokenizer); got {preset!r}")
    config = preset_config(preset, **overrides)
    torch.manual_seed(seed)
    model = LeoMiniForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    processor = LeoMiniProcessor.from_model_config(config, build_tiny_tokenizer())
    return save_for_hub(model, processor, out)


def build_checkpoint(out, preset: str = "tiny", random_init: bool = False, llm=None, vision_expert_dirs=None,
                     seed: int = 0, overrides: dict | None = None) -> Path:
    """`leo-mini build`: from pretrained parts (`llm` + `vision_expert_dirs` folders), the `leo-mini-smol` preset, or
    a random `tiny` model, with `overrides` of LeoMiniConfig options; written atomically (never a half-written or
    overwritten folder)."""
    from ..folders import write_folder_atomically
    from .pretrained_parts import build_from_pretrained_parts
    from .smol import build_leo_mini_smol

    overrides = overrides or {}
    if llm or vision_expert_dirs:
        if not (llm and vision_expert_dirs):
            raise ValueError("--llm needs at least one --vision-expert, and the other way round")
        return write_folder_atomically(out, lambda folder: build_from_pretrained_parts(llm, vision_expert_dirs, folder,
                                                                                       **overrides))
    if preset == "leo-mini-smol":
        return write_folder_atomically(out, lambda folder: build_leo_mini_smol(folder, **overrides))
    if random_init:
        return write_folder_atomically(out, lambda folder: build_random_checkpoint(preset, folder, seed=seed,
                                                                                   **overrides))
    raise ValueError("give --llm and --vision-expert, --preset leo-mini-smol, or --preset tiny --random-init")


def convert_checkpoint(source: str, src, out, token_reduction: str = "none", **overrides) -> Path:
    """`leo-mini convert`: a LLaVA folder → LEO-MINI, a GGUF LLM → a transformers folder, or torchvision
    MobileNetV2 weights → a transformers folder; written atomically."""
    from ..folders import write_folder_atomically
    from .gguf_llm import convert_gguf_llm
    from .llava import convert_llava
    from .mobilenet_v2 import convert_mobilenet_v2

    if source == "llava":
        return write_folder_atomically(out, lambda folder: convert_llava(src, folder, token_reduction, **overrides))
    if overrides:
        raise ValueError(f"--set takes LeoMiniConfig options, which only `convert llava` uses (got {sorted(overrides)})")
    converters = {"gguf": convert_gguf_llm, "mobilenet-v2": convert_mobilenet_v2}
    if source not in converters:
        raise ValueError(f"Unknown source {source!r}; choose llava, gguf or mobilenet-v2")
    return write_folder_atomically(out, lambda folder: converters[source](src, folder))
