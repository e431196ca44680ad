"""PNG plots people would rather look at than read: t-SNE of features, confusion matrix, training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def tsne_plot(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    title: str = "t-SNE of test features",
    max_points: int = 2000,
    seed: int = 0,
) -> Path:
    """2-D t-SNE of ``features`` [M, F] coloured by class (a seeded subsample of ≤ ``max_points``)."""
    from sklearn.manifold import TSNE

    idx = np.arange(len(labels))
    if len(idx) > max_points:
        idx = np.sort(np.random.default_rng(seed).permutation(len(idx))[:max_points])
    x = features[idx].astype(np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    emb = TSNE(
        n_components=2, init="pca", random_state=seed, perplexity=min(30.0, (len(idx) - 1) / 3)
    ).fit_transform(x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 7))
    cmap = plt.get_cmap("tab20" if len(class_names) > 10 else "tab10")
    for c in np.unique(labels[idx]):
        sel = labels[idx] == c
        name = class_names[c] if c < len(class_names) else str(c)
        ax.scatter(emb[sel, 0], emb[sel, 1], s=6, color=cmap(int(c) % cmap.N), label=name)
    if len(class_names) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best", ncol=2)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    return _save(fig, path)


def confusion_plot(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "SVM confusion",
) -> Path:
    """Row-normalised confusion matrix (true class per row)."""
    cm = np.asarray(confusion, dtype=np.float64)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    plt = _pyplot()
    n = len(cm)
    fig, ax = plt.subplots(figsize=(max(5, 0.28 * n + 2), max(4.5, 0.28 * n + 1.5)))
    im = ax.imshow(cm, cmap="viridis", vmin=0, vmax=1)
    names = list(class_names)[:n] if len(class_names) >= n else [str(i) for i in range(n)]
    ax.set_xticks(range(n), names, rotation=90, fontsize=6 if n > 20 else 8)
    ax.set_yticks(range(n), names, fontsize=6 if n > 20 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def curves_plot(
    series: Mapping[str, Sequence[tuple[float, float]]],
    path: str | Path,
    title: str = "",
    xlabel: str = "step",
) -> Path:
    """One line per named series of ``(x, y)`` points."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, points in series.items():
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=name, lw=1.2)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def search_plot(
    rows: Sequence[Mapping[str, object]],
    dims: Sequence[object],
    path: str | Path,
    metric: str = "val_svm_clean",
) -> Path:
    """A hyperparameter search at a glance: ``metric`` against each searched key, one panel per key;
    completed trials filled, trials stopped early hollow. ``dims``: the space's searched dimensions."""
    scale = 100.0 if "val_" in metric else 1.0
    plt = _pyplot()
    dims = list(dims) or [None]
    fig, axes = plt.subplots(1, len(dims), figsize=(4.2 * len(dims), 3.8), squeeze=False)
    for ax, dim in zip(axes[0], dims, strict=True):
        key = getattr(dim, "key", None)
        for status, style in (("completed", {}), ("stopped_early", {"facecolors": "none"})):
            pts = [
                (float(r[key]) if key else i, scale * float(r[metric]))  # type: ignore[arg-type]
                for i, r in enumerate(rows)
                if r["status"] == status
            ]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.scatter(xs, ys, label=status.replace("_", " "), edgecolors="C0", **style)
        if key is not None and getattr(dim, "kind", "") == "one_minus_loguniform":
            ax.set_xscale("function", functions=(_one_minus_log, _one_minus_log_inverse))
        elif getattr(dim, "log_scale", False) or (
            key is not None and getattr(dim, "kind", "") in ("choice", "grid") and _ratio_spread(rows, key)
        ):
            ax.set_xscale("log")
        ax.set_xlabel(key or "trial")
        ax.set_ylabel(f"{metric} (%)" if scale == 100.0 else metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def _one_minus_log(x: np.ndarray) -> np.ndarray:
    """Momenta near 1 spread out: x -> -log10(1 - x)."""
    return -np.log10(np.clip(1 - np.asarray(x, dtype=float), 1e-12, None))


def _one_minus_log_inverse(y: np.ndarray) -> np.ndarray:
    return 1 - 10.0 ** (-np.asarray(y, dtype=float))


def _ratio_spread(rows: Sequence[Mapping[str, object]], key: str) -> bool:
    values = [float(r[key]) for r in rows if isinstance(r[key], (int, float)) and float(r[key]) > 0]  # type: ignore[arg-type]
    return bool(values) and max(values) / min(values) >= 8


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
