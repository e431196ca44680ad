"""The training monitor: does the encoder beat random init, and by how much, as it trains?

Per run, once at the start, a random-init encoder of the same architecture (the run's own encoder before
its first step) is measured; then, every ``eval.eval_every`` epochs, the online point encoder. Both on the
same labelled data: a bounded, seeded subset of a train split (to fit) and of a validation split (to
score), from the pretraining shards or from another labelled dataset (``eval.data``; the papers pretrain
on ShapeNet renders and monitor on ModelNet40). Model selection happens on validation data, never on test.

Numbers, each for the encoder and for random init (``random_…``), and their differences (``gain_…``,
each with its standard error ``gain_…_se``, paired on the same validation objects: :mod:`.paired`):

- ``val_svm_clean``: the clean protocol — standardised features, linear SVM, C by cross-validation on
  the train subset (the demanding protocol: an untrained DGCNN's standardised features are strong);
- ``val_knn``: kNN accuracy (cosine, ``k`` neighbours, weighted votes);
- ``val_svm_crosspoint``: CrossPoint's protocol — raw features, ``SVC(C)`` — labelled as such: it
  flatters any encoder whose raw features are better scaled than an untrained one's;
- ``val_feature_rank`` / ``val_feature_std``: effective rank of the validation features and the mean
  per-dimension std of their unit vectors (× √F: about 1 when spread, → 0 on collapse).

The standard errors need random init's per-object results, which :meth:`Monitor.set_baseline` keeps in
``baseline_correct`` (beside the numbers of ``baseline``); a baseline restored as numbers alone gives
``gain_…_se`` NaN (read as "SE unknown").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import nn

from crossmoco_ray.evaluate.features import EvalSplit, available_splits, extract_features, load_split
from crossmoco_ray.evaluate.knn import knn_predict
from crossmoco_ray.evaluate.paired import paired_gain
from crossmoco_ray.evaluate.svm import clean_svm, crosspoint_svm

ACCURACIES = ("val_svm_clean", "val_knn", "val_svm_crosspoint")


def effective_rank(features: np.ndarray) -> float:
    """``exp(H(p))`` with ``p`` the normalised singular values of the centred ``[M, F]`` features
    (Roy & Vetterli 2007): from 1 (all variance on one axis) to ``min(M, F)``."""
    x = np.asarray(features, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def unit_std(features: np.ndarray) -> float:
    """Mean per-dimension std of L2-normalised features, × √F (≈ 1 when spread, → 0 on collapse)."""
    x = np.asarray(features, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float(x.std(axis=0).mean() * np.sqrt(x.shape[1]))


def carve(split: EvalSplit, fraction: float, seed: int = 0) -> tuple[EvalSplit, EvalSplit]:
    """(the rest, a validation part of ``fraction``) of ``split``, by a seeded permutation."""
    order = np.random.default_rng([seed, 0xCA4E]).permutation(len(split.labels))
    n_val = max(1, round(fraction * len(order)))
    val, rest = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        EvalSplit(split.points[rest], split.labels[rest], split.class_names, split.name),
        EvalSplit(split.points[val], split.labels[val], split.class_names, f"{split.name} (carved val)"),
    )


@dataclass(frozen=True)
class MonitorSpec:
    """What the monitor reads and how it scores (the pretraining config's ``eval`` section decides it; the
    defaults here are the only ones)."""

    root: str  # a labelled source or shards (eval.data), or the pretraining shards
    num_points: int = 1024
    max_samples: int = 2000  # of each split
    C: float = 0.1  # the CrossPoint-protocol SVM's
    up_axis: str = "y"
    variant: str | None = None
    val_fraction: float = 0.1  # carved from train where the data has no val split
    knn_k: int = 20
    crosspoint: bool = True  # also score CrossPoint's protocol
    normalize: bool = True  # centre and scale clouds to the unit sphere, as training does
    seed: int = 0


@dataclass
class Monitor:
    train: EvalSplit
    val: EvalSplit
    source: str
    C: float  # these four from the MonitorSpec (its defaults are the only ones)
    knn_k: int
    crosspoint: bool
    normalize: bool  # clouds centred and scaled as training prepared them
    batch_size: int = 32
    device: str = "auto"
    baseline: dict[str, float] = field(default_factory=dict)
    # random init's per-object results (1 correct, 0 not) on ``val``, per accuracy key: for the gains' SEs
    baseline_correct: dict[str, list[int]] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: MonitorSpec) -> Monitor:
        """Load the monitor's data: ``train`` and ``val`` of ``spec.root``, or ``val`` carved from train."""
        root, axis, variant, n = spec.root, spec.up_axis, spec.variant, spec.num_points
        train = load_split(root, "train", up_axis=axis, num_points=n, variant=variant)  # type: ignore[arg-type]
        if "val" in available_splits(root, axis, variant):
            val = load_split(root, "val", up_axis=axis, num_points=n, variant=variant)  # type: ignore[arg-type]
            source = f"{root}: train → val"
        else:
            f, seed = spec.val_fraction, spec.seed
            train, val = carve(train, f, seed)
            source = f"{root}: train minus {f:.0%} → that {f:.0%} (carved, seed {seed})"
        m = spec.max_samples
        return cls(
            train.subset(m, spec.seed), val.subset(m, spec.seed), source, spec.C, spec.knn_k, spec.crosspoint,
            spec.normalize,
        )  # fmt: skip

    def measure(self, encoder: nn.Module, prefix: str = "") -> dict[str, float]:
        """Every monitor number of ``encoder`` (keys prefixed with ``prefix``)."""
        return self._measure(encoder, prefix)[0]

    def _measure(self, encoder: nn.Module, prefix: str = "") -> tuple[dict[str, float], dict[str, list[int]]]:
        """Every monitor number of ``encoder`` (keys prefixed with ``prefix``) and, per accuracy, which
        validation objects it got right."""
        t0 = time.perf_counter()
        f_train, f_val = (
            extract_features(
                encoder, s.points, self.batch_size, self.device, progress=False, normalize=self.normalize
            )
            for s in (self.train, self.val)
        )
        y_train, y_val = self.train.labels, self.val.labels
        correct = {
            "val_svm_clean": clean_svm(f_train, y_train, f_val, y_val, cv_samples=len(y_train)).correct(
                y_val
            ),
            "val_knn": (knn_predict(f_train, y_train, f_val, k=self.knn_k) == y_val).astype(np.int8),
        }
        if self.crosspoint:
            correct["val_svm_crosspoint"] = crosspoint_svm(f_train, y_train, f_val, y_val, C=self.C).correct(
                y_val
            )
        out = {k: float(c.mean()) if len(c) else float("nan") for k, c in correct.items()}
        out["val_feature_rank"] = effective_rank(f_val)
        out["val_feature_std"] = unit_std(f_val)
        out["monitor_seconds"] = time.perf_counter() - t0
        numbers = {f"{prefix}{k}": v for k, v in out.items()}
        return numbers, {k: [int(x) for x in c] for k, c in correct.items()}

    def set_baseline(self, encoder: nn.Module) -> dict[str, float]:
        """Measure the random-init encoder once; later calls report gains (and their SEs) against it."""
        self.baseline, self.baseline_correct = self._measure(encoder, prefix="random_")
        return self.baseline

    def __call__(self, encoder: nn.Module) -> dict[str, float]:
        """The numbers of ``encoder`` and, per accuracy, ``gain_<key>`` over random init with its standard
        error ``gain_<key>_se`` (``std(d, ddof=1) / sqrt(n)`` of the per-object differences ``d``; NaN
        when random init's per-object results were not kept)."""
        out, correct = self._measure(encoder)
        for key in ACCURACIES:
            if key in out and f"random_{key}" in self.baseline:
                out[f"gain_{key}"] = out[key] - self.baseline[f"random_{key}"]
                base = self.baseline_correct.get(key)
                paired = (
                    paired_gain(correct[key], base)
                    if base is not None and len(base) == len(correct[key])
                    else None
                )
                out[f"gain_{key}_se"] = paired.se if paired is not None else float("nan")
        return out

    def collapse_warning(self, result: dict[str, float]) -> str | None:
        """A warning when the features have collapsed (effective rank below a quarter of random init's)."""
        rank, base = result.get("val_feature_rank"), self.baseline.get("random_val_feature_rank")
        if rank is None or not base:
            return None
        if rank < 0.25 * base or result.get("val_feature_std", 1.0) < 0.05:
            return (
                f"warning: the backbone features look collapsed (effective rank {rank:.1f}, random init "
                f"{base:.1f}; unit-vector std {result.get('val_feature_std', float('nan')):.3f}): lower "
                "optim.lr, raise objective.temperature or check the augmentations"
            )
        return None


def measured_epochs(history: dict[str, Any]) -> list[dict[str, Any]]:
    """The epochs of a run's history in which the monitor ran (histories written before this version also
    carry its last numbers through the epochs in between)."""
    return [e for e in history.get("epochs", []) if "monitor_seconds" in e]
