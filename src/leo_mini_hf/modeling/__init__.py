"""LEO-MINI model code. Every file here is also shipped flat inside checkpoints as Hub remote code."""

from .configuration_leo_mini import LeoMiniConfig
from .modeling_leo_mini import LeoMiniForConditionalGeneration, LeoMiniModel, LeoMiniPreTrainedModel

__all__ = ["LeoMiniConfig", "LeoMiniForConditionalGeneration", "LeoMiniModel", "LeoMiniPreTrainedModel"]
