"""LEO-MINI processor code. Every file here is also shipped flat inside checkpoints as Hub remote code."""

from .image_processing_leo_mini import LeoMiniImageProcessor
from .processing_leo_mini import LEO_MINI_CHAT_TEMPLATE, LeoMiniProcessor

__all__ = ["LEO_MINI_CHAT_TEMPLATE", "LeoMiniImageProcessor", "LeoMiniProcessor"]
