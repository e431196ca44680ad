"""Supervised fine-tuning of pretrained (or random-init) point encoders: ``crossmoco finetune cls`` and
``crossmoco finetune partseg``."""

from .model import PointClassifier, accuracies, classifier_head, smoothed_cross_entropy
from .schema import FinetuneConfig, load_finetune_config

__all__ = [
    "FinetuneConfig",
    "PointClassifier",
    "accuracies",
    "classifier_head",
    "load_finetune_config",
    "smoothed_cross_entropy",
]
