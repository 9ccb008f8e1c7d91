"""emovlm-kd: EmoVLM-KD visual emotion analysis, Hugging Face Hub-native."""

from configuration_emovlm_kd import EmoVLMKDConfig
from image_processing_emovlm_kd import EmoVLMKDImageProcessor
from modeling_emovlm_kd import EmoVLMKDForImageClassification, EmoVLMKDOutput, distillation_loss
from processing_emovlm_kd import EmoVLMKDProcessor

__version__ = "0.1.0"

__all__ = [
    "EmoVLMKDConfig",
    "EmoVLMKDForImageClassification",
    "EmoVLMKDImageProcessor",
    "EmoVLMKDOutput",
    "EmoVLMKDProcessor",
    "distillation_loss",
]
