"""Vision experts: transformers vision models that each turn the canonical image into a sequence of tokens."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers import AutoConfig, AutoModel


class VisionExpert(nn.Module):
    """One vision tower built from its own config (CLIP, SigLIP, DINOv2, ConvNeXt, MobileNetV2, ViT, ...).

    It takes the canonical `pixel_values`, resizes and re-normalises them to its own input, runs its tower and
    returns the chosen layer's features as tokens. ViT-style (B, N, C) and CNN-style (B, C, H, W) outputs alike.
    """

    def __init__(self, expert: dict, canonical_mean: list, canonical_std: list, attn_implementation: str | None = None):
        super().__init__()
        tower_config = dict(expert["config"])
        self.model = AutoModel.from_config(AutoConfig.for_model(tower_config.pop("model_type"), **tower_config))
        if attn_implementation is not None and attn_implementation != self.model.config._attn_implementation:
            try:  # the attention implementation the whole model was asked for
                self.model.set_attn_implementation(attn_implementation)
            except ValueError:  # a tower without it (a CNN has no attention at all) keeps its own default
                pass
        self.image_size = expert["image_size"]
        self.feature_layer = expert["feature_layer"]
        self.num_prefix_tokens = expert["num_prefix_tokens"]
        # canonical normalisation → this expert's: x * scale + shift, per channel (plain floats: model init may
        # run on the meta device)
        mean, std = expert["image_mean"], expert["image_std"]
        self.input_scale = [c_std / e_std for c_std, e_std in zip(canonical_std, std)]
        self.input_shift = [(c_mean - e_mean) / e_std for c_mean, e_mean, e_std in zip(canonical_mean, mean, std)]
        self.num_tokens, self.hidden_size = self._infer_output_shape()

    def train(self, mode: bool = True):
        """A frozen expert (no parameter requires grad) stays in eval mode: training must not switch a pretrained
        tower's batch norm to batch statistics (and update its running statistics) or turn on its dropout."""
        frozen = not any(param.requires_grad for param in self.parameters())
        return super().train(mode and not frozen)

    def _prepare_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[-1] != self.image_size or pixel_values.shape[-2] != self.image_size:
            # resized in float32: antialiased bilinear has no bfloat16 / float16 kernel on CPU
            pixel_values = F.interpolate(
                pixel_values.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                antialias=pixel_values.shape[-1] > self.image_size,
            ).to(pixel_values.dtype)
        scale = torch.tensor(self.input_scale, dtype=pixel_values.dtype, device=pixel_values.device)
        shift = torch.tensor(self.input_shift, dtype=pixel_values.dtype, device=pixel_values.device)
        return pixel_values * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1)

    def _tower_features(self, pixel_values: torch.Tensor, model_call) -> torch.Tensor:
        wants_hidden_states = self.feature_layer is not None
        outputs = model_call(pixel_values=pixel_values, output_hidden_states=wants_hidden_states, return_dict=True)
        features = outputs.hidden_states[self.feature_layer] if wants_hidden_states else outputs.last_hidden_state
        if features.dim() == 4:  # CNN: (B, C, H, W) → (B, H*W, C), row-major
            features = features.flatten(2).transpose(1, 2)
        return features[:, self.num_prefix_tokens :]

    def _infer_output_shape(self) -> tuple[int, int]:
        """(tokens, channels) from a dry run on the meta device: no compute, no memory."""
        state = {
            name: torch.empty_like(tensor, device="meta")
            for name, tensor in [*self.model.named_parameters(), *self.model.named_buffers()]
        }
        pixels = torch.empty(1, 3, self.image_size, self.image_size, device="meta")

        def model_call(**kwargs):
            return functional_call(self.model, state, args=(), kwargs=kwargs)

        features = self._tower_features(pixels, model_call)
        return features.shape[1], features.shape[2]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (n_images, 3, S, S), canonical normalisation, any float dtype (cast to the tower's) → tokens
        (n_images, num_tokens, hidden_size)."""
        return self._tower_features(self._prepare_pixels(pixel_values.to(self.model.dtype)), self.model)
