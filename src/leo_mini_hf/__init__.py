"""leo-mini-hf: the LEO-MINI multimodal LLM (arXiv 2504.04653) as transformers model classes.

Importing the package registers `leo_mini` with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from .modeling import LeoMiniConfig, LeoMiniForConditionalGeneration, LeoMiniModel, LeoMiniPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register("leo_mini", LeoMiniConfig, exist_ok=True)
AutoModel.register(LeoMiniConfig, LeoMiniModel, exist_ok=True)
AutoModelForImageTextToText.register(LeoMiniConfig, LeoMiniForConditionalGeneration, exist_ok=True)

__all__ = ["LeoMiniConfig", "LeoMiniForConditionalGeneration", "LeoMiniModel", "LeoMiniPreTrainedModel"]
