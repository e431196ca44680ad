"""kNN classification on frozen features: cosine similarity, weighted votes as in InstDisc (Wu et al. 2018).

Each of the ``k`` nearest training features votes for its class with weight ``exp(cos / T)``; the class
with the largest summed weight wins. No training, no hyperparameter fit on the test split: a quick,
honest reading of how well a feature space groups classes (the usual monitor of self-supervised runs).
"""

from __future__ import annotations

import numpy as np
import torch


def knn_predict(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Predicted labels ``[M]`` of ``x_test`` [M, F] from ``x_train`` [N, F] with labels ``y_train`` [N]."""
    if len(x_train) == 0:
        raise ValueError("kNN needs training features")
    train = torch.nn.functional.normalize(torch.as_tensor(x_train, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(y_train, dtype=torch.long)
    classes = int(labels.max()) + 1
    k = min(k, len(train))
    out = []
    for start in range(0, len(x_test), chunk):
        test = torch.nn.functional.normalize(
            torch.as_tensor(x_test[start : start + chunk], dtype=torch.float32), dim=1
        )
        sims, idx = (test @ train.t()).topk(k, dim=1)  # [m, k]
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(test), classes).scatter_add_(1, labels[idx], weights)
        out.append(votes.argmax(dim=1))
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def knn_accuracy(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Overall accuracy of :func:`knn_predict` on ``(x_test, y_test)``."""
    pred = knn_predict(x_train, y_train, x_test, k, temperature)
    return float((pred == np.asarray(y_test)).mean()) if len(pred) else float("nan")
