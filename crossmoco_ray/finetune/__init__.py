"""Supervised fine-tuning of pretrained (or random-init) point encoders: ``crossmoco finetune cls`` and
``crossmoco finetune partseg``."""

from crossmoco_ray.config.finetune import FinetuneConfig, load_finetune_config
from crossmoco_ray.finetune.model import PointClassifier, accuracies, classifier_head, smoothed_cross_entropy

__all__ = [
    "FinetuneConfig",
    "PointClassifier",
    "accuracies",
    "classifier_head",
    "load_finetune_config",
    "smoothed_cross_entropy",
]
