"""Fine-tuning LEO-MINI with the HF Trainer: data, collator, training stages, trainer.

    from leo_mini_hf.training import LeoMiniTrainer, LeoMiniDataCollator, LlavaConversationDataset

Names are imported on first use, so `import leo_mini_hf` does not pay for the Trainer's imports.
"""

import importlib

# public name → the module of this package that defines it
_EXPORTS = {
    "LeoMiniTrainer": "trainer",
    "default_training_arguments": "trainer",
    "LeoMiniDataCollator": "collator",
    "LlavaConversationDataset": "data",
    "apply_training_stage": "stages",
    "STAGE_PARTS": "stages",
    "llm_linear_names": "stages",
    "VisionFeatureCache": "feature_cache",
    "BudgetSchedule": "elastic",
    "save_adapter_weights": "adapter_weights",
    "load_adapter_weights": "adapter_weights",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
