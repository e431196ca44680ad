"""The training monitor: a linear SVM on a labelled validation split → ``val_svm_acc``.

Fast enough to run every few epochs: both splits are loaded once and bounded to ``max_samples`` (a seeded
subset), features come from the online point encoder in eval mode, and CrossPoint's SVM (raw features,
C = ``eval.svm_c``, 0.1 as in its training monitor; ``eval.monitor_standardize`` standardises) is fit
on the train subset and scored on validation.
This is model selection on a validation split, unlike the original code, which selected on test.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from torch import nn

from .features import EvalSplit, extract_features, load_split
from .svm import crosspoint_svm


@dataclass
class SvmMonitor:
    train: EvalSplit
    val: EvalSplit
    C: float = 0.1
    standardize: bool = False
    batch_size: int = 32
    device: str = "auto"

    @classmethod
    def from_source(
        cls,
        spec: str,
        train_split: str = "train",
        val_split: str = "val",
        num_points: int = 1024,
        max_samples: int = 2000,
        C: float = 0.1,
        seed: int = 0,
        standardize: bool = False,
    ) -> SvmMonitor:
        train = load_split(spec, train_split, num_points=num_points).subset(max_samples, seed)
        val = load_split(spec, val_split, num_points=num_points).subset(max_samples, seed)
        return cls(train, val, C, standardize)

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        t0 = time.perf_counter()
        f_train = extract_features(encoder, self.train.points, self.batch_size, self.device, progress=False)
        f_val = extract_features(encoder, self.val.points, self.batch_size, self.device, progress=False)
        if self.standardize:  # statistics of the train subset only
            mean, std = f_train.mean(0), f_train.std(0) + 1e-8
            f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
        result = crosspoint_svm(f_train, self.train.labels, f_val, self.val.labels, C=self.C)
        return {
            "val_svm_acc": result.overall_acc,
            "val_svm_mean_class_acc": result.mean_class_acc,
            "val_svm_seconds": time.perf_counter() - t0,
        }
