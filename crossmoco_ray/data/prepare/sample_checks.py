"""What ``prepare`` checks and normalises per sample before it becomes a shard row.

Each check returns the cleaned value or raises a :class:`DataError` naming the sample's file and index, so
``prepare --skip-bad`` can list it in ``skipped.json`` and go on.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from crossmoco_ray.data.render.raster import render_mesh
from crossmoco_ray.data.render.splat import RenderSpec, decode_png, encode_png, render_views
from crossmoco_ray.data.sources.base import MAX_COORDINATE
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

MIN_POINTS = 16  # prepare's default least number of points per cloud (evaluation straight from a source too)
# The smallest radius (largest distance from the centroid) of a cloud: training and evaluation both divide
# by max(radius, 1e-12), so a smaller cloud is not scaled to the unit sphere, and float32 squares of
# coordinates below ~1e-19 lose their precision; 1e-10 keeps clear of both.
MIN_RADIUS = 1e-10
MIN_VIEWS = 2  # CrossMoCo contrasts two distinct views of each object


def val_assignment(sample_id: str, seed: int, fraction: float) -> bool:
    """Whether a train sample goes to the carved validation split (stable per seed and id)."""
    return fraction > 0 and zlib.crc32(f"{seed}:{sample_id}".encode()) / 2**32 < fraction


def check_points(sample: Sample, min_points: int) -> np.ndarray:
    """The sample's points as ``[N, 3]`` float32, or a :class:`DataError` naming file and index.

    Rejected: wrong shape, empty, fewer than ``min_points``, NaN/Inf, coordinates beyond
    :data:`.source.MAX_COORDINATE` (training's float32 normalisation would overflow and see zeros where
    evaluation, in float64, sees the object), degenerate clouds (all points equal, or all on one line), which
    normalise to nothing or to a needle and carry no shape, and clouds smaller than :data:`MIN_RADIUS`.
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
    largest = float(np.abs(pts).max())
    if largest > MAX_COORDINATE:
        raise DataError(
            sample.source,
            f"coordinates reach {largest:.3g}, beyond ±{MAX_COORDINATE:.0e}: training normalises clouds in "
            "float32, where their squared norms overflow",
            sample.index,
        )
    centred = pts.astype(np.float64) - pts.mean(axis=0, dtype=np.float64)
    spread = np.linalg.svd(centred, compute_uv=False)  # √(N·variance) along the principal axes
    scale = float(np.abs(pts).max()) * np.sqrt(pts.shape[0]) + 1e-30
    if spread[0] <= 1e-9 * scale:
        raise DataError(sample.source, "degenerate cloud: all points are equal", sample.index)
    if spread[1] <= 1e-6 * spread[0]:
        raise DataError(sample.source, "degenerate cloud: all points lie on one line", sample.index)
    radius = float(np.sqrt((centred**2).sum(axis=1).max()))
    if radius < MIN_RADIUS:
        raise DataError(
            sample.source,
            f"cloud radius {radius:.3g} is below {MIN_RADIUS:.0e}: too small to normalise",
            sample.index,
        )
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
    """PNG bytes of the sample's views (rendered when it has none), checked to decode; ≥ 2 needed, rendered
    or not (a render spec of one azimuth and one elevation gives one view: named here, not in training).

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
        if len(images) < MIN_VIEWS:
            raise DataError(
                sample.source,
                f"{len(images)} rendered view(s); CrossMoCo needs at least {MIN_VIEWS}: render more azimuths "
                "or elevations",
                sample.index,
            )
        return [encode_png(img) for img in images], images
    decoded = []
    for v, data in enumerate(sample.views):
        try:
            decoded.append(decode_png(data))
        except ValueError as err:
            raise DataError(sample.source, f"view {v} is not a readable image: {err}", sample.index) from err
    if len(decoded) < MIN_VIEWS:
        raise DataError(
            sample.source, f"{len(decoded)} view(s); CrossMoCo needs at least {MIN_VIEWS}", sample.index
        )
    return list(sample.views), decoded
