"""Checkpoint builders."""

from pathlib import Path

import torch

from ..modeling import LeoMiniConfig, LeoMiniForConditionalGeneration
from ..processor import LEO_MINI_CHAT_TEMPLATE, LeoMiniImageProcessor, LeoMiniProcessor
from .hub import save_for_hub
from .tiny_tokenizer import IMAGE_TOKEN, build_tiny_tokenizer


def build_processor(config, tokenizer, image_token: str = IMAGE_TOKEN) -> LeoMiniProcessor:
    """The processor matching a model config: its canonical image size and statistics, its tokens per image."""
    image_processor = LeoMiniImageProcessor(
        size={"height": config.image_size, "width": config.image_size},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    return LeoMiniProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=LEO_MINI_CHAT_TEMPLATE,
                            num_image_tokens=config.num_image_tokens, image_token=image_token)


def build_random_checkpoint(preset: str, out, seed: int = 0, **overrides) -> Path:
    """A complete, loadable checkpoint with random weights: config, safetensors, processor, tokenizer, chat
    template, remote code. Offline and in seconds for `tiny`."""
    if preset != "tiny":
        raise ValueError(f"--random-init builds only the 'tiny' preset (it has an offline tokenizer); got {preset!r}")
    config = LeoMiniConfig.from_preset(preset, **overrides)
    torch.manual_seed(seed)
    model = LeoMiniForConditionalGeneration(config)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    processor = build_processor(config, build_tiny_tokenizer())
    return save_for_hub(model, processor, out)
