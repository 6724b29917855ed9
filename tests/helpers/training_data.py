"""Tiny in-memory chat samples for training tests."""

import numpy as np
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 30)}


def colour_sample(colour: str, size: int = 24) -> dict:
    """One image of a flat colour, the question about it, the colour as the answer."""
    image = Image.new("RGB", (size, size), COLOURS[colour])
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": colour}]},
    ]}


def overfit_set(repeats: int = 4) -> list[dict]:
    return [colour_sample(colour) for colour in COLOURS] * repeats


def noise_image(seed: int, size: int = 24) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8))


def frozen_fingerprint(model) -> dict[str, torch.Tensor]:
    """Copies of every frozen parameter and every buffer (to check they are bit-identical after training)."""
    state = {name: param.detach().clone() for name, param in model.named_parameters() if not param.requires_grad}
    state.update({name: buffer.detach().clone() for name, buffer in model.named_buffers()})
    return state
