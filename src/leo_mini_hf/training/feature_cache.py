"""A disk cache of frozen vision experts' outputs, so stage-3 training runs each expert once per image.

Entries are keyed by the expert's fingerprint (class, tower config, input size and normalisation, feature layer,
dtype and a digest of every weight and buffer) and by the image's content (a digest of its canonical pixel values,
which also covers the image processor's settings). A changed expert or image therefore never hits an old entry.
One safetensors file per (expert, image), written atomically: concurrent writers (DDP ranks) are safe. Each entry
carries a digest of its data; a damaged entry (flipped bytes, non-finite values, wrong shape) is a miss and is
recomputed.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

CACHE_FORMAT = 2  # 2: every entry carries a digest of its data


def _tensor_digest(hasher, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    hasher.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy


def expert_fingerprint(expert) -> str:
    """Hex digest of everything that decides a `VisionExpert`'s output for given pixels."""
    hasher = hashlib.sha256()
    description = {
        "format": CACHE_FORMAT,
        "class": type(expert.model).__name__,
        "config": expert.model.config.to_dict(),
        "image_size": expert.image_size,
        "feature_layer": expert.feature_layer,
        "num_prefix_tokens": expert.num_prefix_tokens,
        "input_scale": expert.input_scale,
        "input_shift": expert.input_shift,
    }
    description["config"].pop("transformers_version", None)
    hasher.update(json.dumps(description, sort_keys=True, default=str).encode())
    for name, tensor in sorted([*expert.model.named_parameters(), *expert.model.named_buffers()]):
        hasher.update(name.encode())
        _tensor_digest(hasher, tensor)
    return hasher.hexdigest()


def data_digest(tensor: torch.Tensor) -> str:
    """Hex digest of a tensor's dtype, shape and bytes: what an entry's metadata holds to prove it intact."""
    hasher = hashlib.blake2b(digest_size=16)
    _tensor_digest(hasher, tensor)
    return hasher.hexdigest()


def image_key(pixels: torch.Tensor) -> str:
    """Hex digest of one image's canonical pixel values (3, S, S), dtype and shape included."""
    hasher = hashlib.blake2b(digest_size=20)
    _tensor_digest(hasher, pixels)
    return hasher.hexdigest()


class VisionFeatureCache:
    """Serve frozen `VisionExpert` outputs from `directory`, computing (and storing) only the images it has not seen.

    `attach(model)` makes every vision expert of a LEO-MINI model read through the cache; `detach(model)` restores
    the plain path. Results are the expert's own outputs, stored at full precision.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def attach(self, model) -> None:
        for index, expert in enumerate(model.vision_experts):
            trainable = [name for name, param in expert.named_parameters() if param.requires_grad]
            if trainable:
                raise ValueError(
                    f"vision expert {index} has trainable parameters ({trainable[0]}, ...): its outputs change during "
                    "training, so they cannot be cached. Freeze it (stage 'finetune' or 'pretrain') or turn the "
                    "feature cache off."
                )
            expert_dir = self.directory / expert_fingerprint(expert)[:32]
            plain_forward = type(expert).forward.__get__(expert)
            expert.forward = _CachedExpertForward(self, expert_dir, plain_forward, expert.num_tokens,
                                                  expert.hidden_size)

    @staticmethod
    def detach(model) -> None:
        for expert in model.vision_experts:
            if isinstance(expert.__dict__.get("forward"), _CachedExpertForward):
                del expert.forward

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}


class _CachedExpertForward:
    """Replaces one expert's `forward`: pixel_values (n, 3, S, S) → tokens (n, num_tokens, hidden_size)."""

    def __init__(self, cache: VisionFeatureCache, directory: Path, plain_forward, num_tokens: int, hidden_size: int):
        self.cache, self.directory, self.plain_forward = cache, directory, plain_forward
        self.num_tokens, self.hidden_size = num_tokens, hidden_size

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def _read(self, path: Path) -> torch.Tensor | None:
        """The stored features, or None when the entry is absent or damaged (then it is recomputed and rewritten)."""
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                digest = (handle.metadata() or {}).get("digest")
                features = handle.get_tensor("features")
        except (SafetensorError, KeyError, OSError, ValueError, RuntimeError):
            return None
        if tuple(features.shape) != (self.num_tokens, self.hidden_size) or digest != data_digest(features):
            return None
        if not torch.isfinite(features).all():
            return None
        return features

    def _write(self, path: Path, features: torch.Tensor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(handle)
        try:
            features = features.detach().cpu().contiguous()
            save_file({"features": features}, temporary, metadata={"digest": data_digest(features)})
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        paths = [self._path(image_key(pixels)) for pixels in pixel_values]
        features = [self._read(path) for path in paths]
        missing = [index for index, found in enumerate(features) if found is None]
        self.cache.hits += len(paths) - len(missing)
        self.cache.misses += len(missing)
        if missing:
            with torch.no_grad():
                computed = self.plain_forward(pixel_values[missing])
            for index, row in zip(missing, computed):
                self._write(paths[index], row)
                features[index] = row
        return torch.stack([f.to(pixel_values.device) for f in features])
