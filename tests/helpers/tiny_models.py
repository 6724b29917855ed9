"""Tiny models and inputs for the tests. Sizes come from the `tiny` preset, the one place they are defined."""

import torch

from leo_mini_hf import LeoMiniConfig, LeoMiniForConditionalGeneration, preset_config


def tiny_config(**overrides) -> LeoMiniConfig:
    return preset_config("tiny", **overrides)


def tiny_model(seed: int = 0, randomize_lora: bool = True, **overrides) -> LeoMiniForConditionalGeneration:
    """A tiny random model in eval mode. With `randomize_lora`, the zero-initialised LoRA B matrices get random
    values, so the MMoE path changes the output (as after training) and tests can see it."""
    torch.manual_seed(seed)
    model = LeoMiniForConditionalGeneration(tiny_config(**overrides)).eval()
    if randomize_lora:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0.0, 0.5)
    return model


def image_prompt(config, text_before=(10, 11), text_after=(12, 13, 14), num_images=1) -> list[int]:
    """Token ids: BOS, text, one block of image tokens per image, more text."""
    image_block = [config.image_token_id] * config.num_image_tokens
    return [config.text_config.bos_token_id, *text_before, *(image_block * num_images), *text_after]


def random_pixels(config, num_images=1, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, config.image_size, config.image_size, generator=generator)
