"""Linear SVM on frozen features (METHOD.md §1.11).

- ``crosspoint``: CrossPoint's protocol exactly: ``SVC(kernel="linear", C)`` fit on the full train split,
  scored on the full test split, raw features (no normalisation).
- ``clean``: standardised features and C chosen by stratified cross-validation **on train only** (on a
  bounded subsample for speed), then fit on all of train and scored on test.

Both report overall accuracy and mean per-class accuracy, and keep each test object's prediction (so two
encoders' results on the same objects give a paired gain and its standard error: :mod:`.paired`).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

CLEAN_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
# libsvm has no iteration cap by default; on raw features of a badly scaled encoder it can run for hours.
MAX_ITER = 1_000_000


@dataclass
class SvmResult:
    protocol: str
    C: float
    overall_acc: float
    mean_class_acc: float
    n_train: int
    n_test: int
    seconds: float
    converged: bool = True
    cv: dict[str, float] = field(default_factory=dict)  # C → mean CV accuracy (clean protocol)
    confusion: list[list[int]] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)  # per test object, in the test split's order

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("confusion")
        out.pop("predictions")
        return out

    def correct(self, y_test: np.ndarray) -> np.ndarray:
        """Per test object: 1 where the prediction is right, 0 where not."""
        return (np.asarray(self.predictions) == np.asarray(y_test)).astype(np.int8)


def _fit(model: Any, x: np.ndarray, y: np.ndarray) -> tuple[Any, bool]:
    """Fit, noting whether libsvm hit the iteration cap (a ConvergenceWarning) instead of printing it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _score(
    model: Any, x_test: np.ndarray, y_test: np.ndarray
) -> tuple[float, float, list[list[int]], list[int]]:
    pred = model.predict(x_test)
    labels = np.unique(np.concatenate([y_test, pred]))
    cm = confusion_matrix(y_test, pred, labels=labels).tolist()
    with warnings.catch_warnings():  # small validation subsets may lack classes the model predicts
        warnings.simplefilter("ignore", UserWarning)
        mean_class = float(balanced_accuracy_score(y_test, pred))
    return float((pred == y_test).mean()), mean_class, cm, [int(p) for p in pred]


def crosspoint_svm(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, C: float = 0.01
) -> SvmResult:
    """CrossPoint's linear SVM: raw features, the given C."""
    t0 = time.perf_counter()
    model, converged = _fit(SVC(kernel="linear", C=C, max_iter=MAX_ITER), x_train, y_train)
    acc, macc, cm, pred = _score(model, x_test, y_test)
    seconds = time.perf_counter() - t0
    return SvmResult(
        "crosspoint",
        C,
        acc,
        macc,
        len(y_train),
        len(y_test),
        seconds,
        converged,
        confusion=cm,
        predictions=pred,
    )


def clean_svm(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    Cs: Sequence[float] = CLEAN_CS,
    folds: int = 3,
    cv_samples: int = 3000,
    seed: int = 0,
) -> SvmResult:
    """Standardised features, C by ``folds``-fold CV on (a ≤ ``cv_samples`` subsample of) train."""
    t0 = time.perf_counter()
    idx = np.arange(len(y_train))
    if len(idx) > cv_samples:
        idx = np.sort(np.random.default_rng(seed).permutation(len(idx))[:cv_samples])
    counts = np.bincount(y_train[idx])
    n_splits = max(2, min(folds, int(counts[counts > 0].min())))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    scores = {}
    for C in Cs:
        pipe = make_pipeline(StandardScaler(), SVC(kernel="linear", C=C, max_iter=MAX_ITER))
        scores[f"{C:g}"] = float(cross_val_score(pipe, x_train[idx], y_train[idx], cv=cv).mean())
    best = max(Cs, key=lambda c: scores[f"{c:g}"])
    pipe = make_pipeline(StandardScaler(), SVC(kernel="linear", C=best, max_iter=MAX_ITER))
    model, converged = _fit(pipe, x_train, y_train)
    acc, macc, cm, pred = _score(model, x_test, y_test)
    seconds = time.perf_counter() - t0
    return SvmResult(
        "clean", best, acc, macc, len(y_train), len(y_test), seconds, converged, scores, cm, pred
    )
