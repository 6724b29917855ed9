"""leo-mini-hf: the LEO-MINI multimodal LLM (arXiv 2504.04653) as transformers model classes.

Importing the package registers `leo_mini` with transformers' Auto classes (config, models, processors).
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .modeling import LeoMiniConfig, LeoMiniForConditionalGeneration, LeoMiniModel, LeoMiniPreTrainedModel
from .presets import preset_config
from .processor import LeoMiniImageProcessor, LeoMiniProcessor

__version__ = "0.2.0"

AutoConfig.register("leo_mini", LeoMiniConfig, exist_ok=True)
AutoModel.register(LeoMiniConfig, LeoMiniModel, exist_ok=True)
AutoModelForImageTextToText.register(LeoMiniConfig, LeoMiniForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(LeoMiniConfig, image_processor_classes={"pil": LeoMiniImageProcessor}, exist_ok=True)
AutoProcessor.register(LeoMiniConfig, LeoMiniProcessor, exist_ok=True)
# Every save from Python (`save_pretrained`, `Trainer.save_model`, `push_to_hub`) copies the classes' files into the
# folder as remote code (transformers' `custom_object_save`), so it loads where this package is not installed.
LeoMiniConfig.register_for_auto_class()
LeoMiniModel.register_for_auto_class("AutoModel")
LeoMiniForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LeoMiniImageProcessor.register_for_auto_class("AutoImageProcessor")
LeoMiniProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "LeoMiniConfig",
    "LeoMiniForConditionalGeneration",
    "LeoMiniImageProcessor",
    "LeoMiniModel",
    "LeoMiniPreTrainedModel",
    "LeoMiniProcessor",
    "preset_config",
]
