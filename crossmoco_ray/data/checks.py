"""What ``prepare`` checks and normalises per sample before it becomes a shard row.

Each check returns the cleaned value or raises a :class:`DataError` naming the sample's file and index, so
``prepare --skip-bad`` can list it in ``skipped.json`` and go on.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from .raster import render_mesh
from .render import RenderSpec, decode_png, encode_png, render_views
from .types import DataError, Sample


def val_assignment(sample_id: str, seed: int, fraction: float) -> bool:
    """Whether a train sample goes to the carved validation split (stable per seed and id)."""
    return fraction > 0 and zlib.crc32(f"{seed}:{sample_id}".encode()) / 2**32 < fraction


def check_points(sample: Sample, min_points: int) -> np.ndarray:
    """The sample's points as ``[N, 3]`` float32, or a :class:`DataError` naming file and index.

    Rejected: wrong shape, empty, fewer than ``min_points``, NaN/Inf, and degenerate clouds (all points
    equal, or all on one line), which normalise to nothing or to a needle and carry no shape.
    """
    pts = np.asarray(sample.points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise DataError(sample.source, f"points must be [N, 3], got {tuple(pts.shape)}", sample.index)
    if pts.shape[0] == 0:
        raise DataError(sample.source, "empty point cloud", sample.index)
    if pts.shape[0] < min_points:
        raise DataError(sample.source, f"only {pts.shape[0]} points (fewer than {min_points})", sample.index)
    finite = np.isfinite(pts).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise DataError(sample.source, f"NaN or Inf at point {bad}", sample.index)
    centred = pts.astype(np.float64) - pts.mean(axis=0, dtype=np.float64)
    spread = np.linalg.svd(centred, compute_uv=False)  # √(N·variance) along the principal axes
    scale = float(np.abs(pts).max()) * np.sqrt(pts.shape[0]) + 1e-30
    if spread[0] <= 1e-9 * scale:
        raise DataError(sample.source, "degenerate cloud: all points are equal", sample.index)
    if spread[1] <= 1e-6 * spread[0]:
        raise DataError(sample.source, "degenerate cloud: all points lie on one line", sample.index)
    return pts.astype(np.float32, copy=False)


def check_label(sample: Sample, class_names: list[str] | None, hint: str = "") -> int:
    """The sample's label as a class index (−1 for unlabelled sources), or a :class:`DataError`."""
    if sample.label is None:
        return -1
    label = sample.label
    if isinstance(label, (float, np.floating)) and not (
        math.isfinite(float(label)) and label == round(float(label))
    ):
        raise DataError(sample.source, f"label {label!r} is not an integer class index", sample.index)
    label = int(label)
    if label < 0:
        raise DataError(
            sample.source,
            f"label {label} is negative; labels are class indices 0..C-1 (-1 marks unlabelled objects)"
            + hint,
            sample.index,
        )
    if class_names is not None and label >= len(class_names):
        raise DataError(sample.source, f"label {label} outside 0..{len(class_names) - 1}{hint}", sample.index)
    return label


def resample(points: np.ndarray, n: int, sample_id: str, seed: int) -> np.ndarray:
    """Exactly ``n`` points: a seeded subset, or all points plus seeded repeats when there are fewer."""
    rng = np.random.default_rng([seed, zlib.crc32(sample_id.encode())])
    if points.shape[0] >= n:
        idx = np.sort(rng.choice(points.shape[0], n, replace=False))
    else:
        idx = np.concatenate([np.arange(points.shape[0]), rng.choice(points.shape[0], n - points.shape[0])])
    return points[idx]


def check_views(sample: Sample, pts: np.ndarray, render: RenderSpec) -> tuple[list[bytes], list[np.ndarray]]:
    """PNG bytes of the sample's views (rendered when it has none), checked to decode; ≥ 2 needed.

    A sample without views is rendered from its mesh when it has one (shaded triangles) unless
    ``render.points_only``, else from ``pts`` (splats in ``render.mode``).

    Also returns the views as images (``[H, W, 3]`` uint8 each), so the preview contact sheet need not
    decode them again.
    """
    if sample.views is None:
        if sample.mesh is not None and not render.points_only:
            images = list(render_mesh(*sample.mesh, render))
        else:
            images = list(render_views(pts, render))
        return [encode_png(img) for img in images], images
    decoded = []
    for v, data in enumerate(sample.views):
        try:
            decoded.append(decode_png(data))
        except ValueError as err:
            raise DataError(sample.source, f"view {v} is not a readable image: {err}", sample.index) from err
    if len(decoded) < 2:
        raise DataError(sample.source, f"{len(decoded)} view(s); CrossMoCo needs at least 2", sample.index)
    return list(sample.views), decoded
