"""Converters and builders: pretrained parts (GGUF LLMs, torchvision MobileNetV2, LLaVA) into LEO-MINI checkpoints."""
