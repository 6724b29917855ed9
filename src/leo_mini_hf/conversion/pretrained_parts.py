"""Build a LEO-MINI checkpoint from pretrained parts: any causal LM folder + vision model folders.

The pretrained weights are loaded exactly (and checked); CoTR, the projector and MMoE start fresh, with zero LoRA B,
so the LLM computes exactly what the original LLM computes on text.
"""

import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers import logging as transformers_logging
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
)

from ..folders import require_path
from ..hub.checkpoint_folder import save_for_hub
from ..hub.model_card import hub_model_id
from ..modeling import LeoMiniConfig, LeoMiniForConditionalGeneration
from ..presets import check_option_names
from ..processor import LeoMiniProcessor
from .tiny_tokenizer import IMAGE_TOKEN

PREFIX_TOKENS = {"clip_vision_model": 1, "dinov2": 1, "vit": 1, "siglip_vision_model": 0}
DEFAULT_FEATURE_LAYER = {"clip_vision_model": -2}  # LLaVA's choice for CLIP: the penultimate layer
DEFAULT_STATISTICS = {"clip_vision_model": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
                      "siglip_vision_model": (IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)}


def _preprocessor_statistics(folder: Path) -> dict:
    """image_size / image_mean / image_std from a folder's preprocessor or processor config, where present."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if path.is_file():
            config = json.loads(path.read_text())
            config = config.get("image_processor", config)
            size = config.get("crop_size") or config.get("size") or {}
            side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
            return {"image_size": side, "image_mean": config.get("image_mean"), "image_std": config.get("image_std")}
    return {}


def vision_expert_spec(folder, feature_layer=None, num_prefix_tokens=None) -> dict:
    """The `vision_experts` entry for a transformers vision model folder."""
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    if hasattr(config, "vision_config") and config.vision_config is not None:
        raise ValueError(f"{folder} holds a {config.model_type} model with a vision_config: pass a folder with the "
                         "vision tower alone (e.g. a CLIPVisionModel)")
    model_type = config.model_type
    statistics = _preprocessor_statistics(folder)
    mean, std = DEFAULT_STATISTICS.get(model_type, (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    image_size = statistics.get("image_size") or getattr(config, "image_size", None)
    if not isinstance(image_size, int):
        raise ValueError(f"Cannot tell the input size of the vision model in {folder}; it needs an image_size")
    tower_config = config.to_dict()
    for key in ("architectures", "id2label", "label2id", "transformers_version", "_name_or_path", "dtype"):
        tower_config.pop(key, None)
    return {
        "config": tower_config,
        "image_size": image_size,
        "feature_layer": feature_layer if feature_layer is not None else DEFAULT_FEATURE_LAYER.get(model_type),
        "num_prefix_tokens": num_prefix_tokens if num_prefix_tokens is not None else PREFIX_TOKENS.get(model_type, 0),
        "image_mean": list(statistics.get("image_mean") or mean),
        "image_std": list(statistics.get("image_std") or std),
    }


@contextlib.contextmanager
def transformers_verbosity_error():
    """transformers logs errors only, inside the block."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def load_complete(auto_class, folder, what: str):
    """`auto_class.from_pretrained(folder)` in float32, refusing a checkpoint that lacks any of the model's weights
    (transformers would fill them with random values and only warn)."""
    with transformers_verbosity_error():  # unused weights (a classifier head) are expected; missing ones raise
        model, loading = auto_class.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    broken = sorted(loading["missing_keys"]) + sorted(str(key) for key in loading["mismatched_keys"])
    if broken:
        raise ValueError(f"{what} in {folder} lacks weights or has them in other shapes: {broken[:5]}")
    return model


def copy_weights_exactly(target: torch.nn.Module, source_state: dict, what: str, allowed_missing=frozenset()) -> None:
    """Load `source_state` into `target` and check every tensor arrived bit-identical; only the keys named in
    `allowed_missing` may be absent from `source_state`."""
    result = target.load_state_dict(source_state, strict=False)
    missing = [key for key in result.missing_keys if key not in allowed_missing]
    if missing or result.unexpected_keys:
        raise ValueError(f"{what}: weights do not fit (missing {missing[:5]}, unexpected {result.unexpected_keys[:5]})")
    target_state = target.state_dict()
    for key, tensor in source_state.items():
        if not torch.equal(target_state[key], tensor.to(target_state[key].dtype)):
            raise ValueError(f"{what}: tensor {key} did not load exactly")


def copy_llm_weights_exactly(model, llm_state: dict, lm_head_state: dict) -> None:
    """A pretrained LLM's weights into LEO-MINI's language model (and LM head, unless tied), exactly. Only the MMoE
    adapters, which the pretrained LLM cannot have, may be missing; every weight of the LLM's own (its routers too,
    for a mixture-of-experts LLM) must be there."""
    prefix = "model.language_model."
    adapter_keys = {name.removeprefix(prefix) for name, part in model.parameter_parts().items()
                    if part.startswith("mmoe_") and name.startswith(prefix)}
    own_keys = set(model.language_model.state_dict())

    def own_key(key: str) -> str:  # an MMoE layer holds the LLM's linear as its `base_linear`
        layer, _, name = key.rpartition(".")
        wrapped = f"{layer}.base_linear.{name}"
        return wrapped if key not in own_keys and wrapped in own_keys else key

    llm_state = {own_key(key): tensor for key, tensor in llm_state.items()}
    copy_weights_exactly(model.language_model, llm_state, "LLM", allowed_missing=adapter_keys)
    if not model.config.tie_word_embeddings:
        copy_weights_exactly(model.lm_head, lm_head_state, "LM head")


def build_from_pretrained_parts(llm_dir, expert_dirs: list, out, **options) -> Path:
    """Assemble LEO-MINI from a causal LM folder and vision model folders; write a Hub-ready checkpoint to `out`."""
    model, processor = assemble_from_pretrained_parts(llm_dir, expert_dirs, **options)
    base_models = [hub_model_id(folder) for folder in [llm_dir, *expert_dirs]]
    return save_for_hub(model, processor, out, card={"base_models": [m for m in base_models if m is not None]})


def assemble_from_pretrained_parts(llm_dir, expert_dirs: list, image_size: int | None = None,
                                   expert_image_sizes: list | None = None, **config_overrides):
    """In memory: (LeoMiniForConditionalGeneration, LeoMiniProcessor) from a causal LM and vision model folders.

    `expert_image_sizes` overrides each expert's input side (CNNs take any size); `image_size` is the canonical
    input (default: the largest expert input). Other keyword arguments are `LeoMiniConfig` options.
    """
    check_option_names(config_overrides)
    llm_dir = require_path(llm_dir, "The LLM")
    for index, folder in enumerate(expert_dirs):
        require_path(folder, f"Vision expert {index}")
    tokenizer = AutoTokenizer.from_pretrained(llm_dir, padding_side="left")  # an init argument: saved with it
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) in (None, tokenizer.unk_token_id):
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    llm = load_complete(AutoModelForCausalLM, llm_dir, "The LLM")
    if len(tokenizer) > llm.config.vocab_size:
        with transformers_verbosity_error():  # its note on mean resizing, which is asked for here
            llm.resize_token_embeddings(len(tokenizer), mean_resizing=True)

    specs = [vision_expert_spec(folder) for folder in expert_dirs]
    if not specs:
        raise ValueError("Give at least one vision expert folder")
    for spec, size in zip(specs, expert_image_sizes or []):
        if size:
            spec["image_size"] = size
    config = LeoMiniConfig(
        text_config=llm.config.to_dict(),
        vision_experts=specs,
        image_size=image_size or max(spec["image_size"] for spec in specs),
        image_mean=specs[0]["image_mean"],
        image_std=specs[0]["image_std"],
        image_token_id=image_token_id,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
        **config_overrides,
    )
    model = LeoMiniForConditionalGeneration(config)
    copy_llm_weights_exactly(model, llm.model.state_dict(), llm.lm_head.state_dict())
    for index, folder in enumerate(expert_dirs):
        expert = load_complete(AutoModel, folder, f"Vision expert {index}")
        copy_weights_exactly(model.vision_experts[index].model, expert.state_dict(), f"vision expert {index}")

    generation_config = llm.generation_config
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.suppress_tokens = [image_token_id]  # the placeholder is input-only
    model.generation_config = generation_config
    return model, LeoMiniProcessor.from_model_config(config, tokenizer, IMAGE_TOKEN)
