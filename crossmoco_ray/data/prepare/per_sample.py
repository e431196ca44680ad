"""``prepare``'s per-sample work: one item of a source → a :class:`Processed` sample (read, checked,
resampled, rendered), ready for the driver to place.

The work is a pure function of the item and the options, so it runs in this process
(:func:`processed_locally`) or on Ray Data (:mod:`.on_ray`) with the same result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from crossmoco_ray.data.prepare.decimate import decimated
from crossmoco_ray.data.prepare.options import PrepareOptions
from crossmoco_ray.data.prepare.sample_checks import check_label, check_points, check_views, resample
from crossmoco_ray.data.render.camera import RenderSpec
from crossmoco_ray.data.render.raster import render_mesh
from crossmoco_ray.data.render.splat import decode_png, render_views
from crossmoco_ray.data.shards.meshes import decode_mesh, encode_mesh
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError


@dataclass
class Processed:
    """One sample after prepare's per-sample work (read, check, resample, render), ready to be placed.

    The work is a pure function of the sample and the options, so it can run anywhere (a Ray Data task);
    what depends on other samples (duplicate ids, one point count, the shuffle) is decided in order by
    the driver. Two error slots keep the local path's precedence: ``points_error`` (reading, the points)
    comes before the point-count agreement, ``error`` (label, views) after it.
    """

    id: str | None  # None: the item was a reading error
    source: str = ""
    index: int = 0
    label: int = -1
    points: np.ndarray | None = None
    views: list[bytes] | None = None
    mesh: bytes | None = None  # a .meshes cell (prepare --store meshes|both), decimated to the budget
    points_error: DataError | None = None
    error: DataError | None = None


def process(
    item: Sample | DataError, opts: PrepareOptions, class_names: list[str] | None, hint: str
) -> Processed:
    """The per-sample work of prepare on one item of a source (never raises :class:`DataError`)."""
    if isinstance(item, DataError):
        return Processed(None, item.source, item.index or 0, points_error=item)
    out = Processed(item.id, item.source, item.index)
    try:
        pts = check_points(item, opts.min_points)
        if opts.num_points is not None:
            pts = resample(pts, opts.num_points, item.id, opts.seed)
    except DataError as err:
        out.points_error = err
        return out
    out.points = pts
    try:
        out.label = check_label(item, class_names, hint)
        if opts.renders or item.views is not None:
            out.views, _ = check_views(item, pts, opts.render)
        else:
            out.views = []  # rendered while training, from fresh viewpoints
        if opts.meshes and item.mesh is not None and not opts.render.points_only:
            out.mesh = encode_mesh(*decimated(item.mesh, opts.mesh_faces, item.source, item.index))
    except DataError as err:
        out.error = err
    return out


def processed_locally(
    source: Source, split: str, opts: PrepareOptions, class_names: list[str] | None, hint: str
) -> Iterator[Processed]:
    """:func:`process` over every task of ``split`` in order, in this process."""
    for task in source.tasks(split):
        for item in source.read_task(split, task):
            yield process(item, opts, class_names, hint)


def preview_views(item: Processed, render: RenderSpec) -> list[np.ndarray]:
    """The views of an admitted ``item`` for the preview contact sheet: its stored views decoded, or, when
    only its mesh (or points) is stored, rendered from it as training's fixed viewpoints would be."""
    if item.views:
        return [decode_png(v) for v in item.views]
    if item.mesh is not None:
        return list(render_mesh(*decode_mesh(item.mesh, item.id or item.source), render))
    assert item.points is not None
    return list(render_views(item.points, render))
