"""Views rendered while training: fresh random viewpoints every epoch, or the fixed ones, of meshes or points.

``prepare --store meshes`` keeps each object's mesh instead of its renders; the training pipeline then
renders the views a step needs (``data.views_per_sample``, 2 by default, not all 6) from viewpoints drawn
for that object and epoch (:class:`Viewpoints`):

- ``fresh``: azimuth uniform in ``azimuth`` (degrees about the up axis), elevation uniform in ``elevation``,
  zoom (the orthographic camera's distance) uniform in ``zoom``, and the light turned by up to
  ``light_jitter`` degrees from the fixed one — a new look at every object every epoch;
- ``fixed``: distinct views of the grid ``azimuths × elevations`` (what ``prepare`` renders and stores),
  rendered instead of decoded: the same distribution of images as stored renders (the A/B's other arm).

Objects with a mesh are rendered as shaded triangles (:func:`.raster.render_mesh`); point-only objects (and
every object with ``points_only``) as splats of their stored points in ``mode`` (:func:`.splat.render_views`).

Reproducible and resumable: with a seed, an object's viewpoints are drawn from a generator of
``(seed, epoch, object id)`` alone (:func:`object_rng`), so they do not depend on which batch, worker or
read task the object lands in, and a run resumed mid-epoch renders exactly what the uninterrupted run did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from PIL import Image

from crossmoco_ray.data.render.camera import MAX_ZOOM, MIN_ZOOM, RenderSpec
from crossmoco_ray.data.render.raster import render_mesh
from crossmoco_ray.data.render.splat import render_views

VIEWPOINT_STREAM = 0x7E5  # the stream of an object's viewpoints, apart from the batch's augmentations


@dataclass(frozen=True)
class Viewpoints:
    """Which viewpoints the pipeline renders, and how (the look comes from ``spec``).

    Attributes:
        kind: ``"fresh"`` (random every epoch) or ``"fixed"`` (distinct views of ``spec``'s grid).
        spec: the base render: size, splat look (``mode``, ``point_size``), ``supersample``, the fixed
            grid (``azimuths``, ``elevations``), ``light``, ``ambient``, ``points_only``.
        azimuth: fresh: range of the azimuth, degrees.
        elevation: fresh: range of the elevation, degrees.
        zoom: fresh: range of the zoom (1 = the stored renders' framing).
        light_jitter: fresh: the light turns by up to this many degrees.
    """

    kind: Literal["fresh", "fixed"] = "fresh"
    spec: RenderSpec = field(default_factory=RenderSpec)
    azimuth: tuple[float, float] = (0.0, 360.0)
    elevation: tuple[float, float] = (0.0, 40.0)
    zoom: tuple[float, float] = (0.9, 1.1)
    light_jitter: float = 15.0

    def __post_init__(self) -> None:
        if self.kind not in ("fresh", "fixed"):
            raise ValueError(f"Viewpoints.kind must be 'fresh' or 'fixed', got {self.kind!r}")
        for name, lo, hi in (("azimuth", -720, 720), ("elevation", -90, 90), ("zoom", MIN_ZOOM, MAX_ZOOM)):
            a, b = getattr(self, name)
            if not (np.isfinite([a, b]).all() and lo <= a <= b <= hi):
                raise ValueError(f"Viewpoints.{name} must be a range [low, high] within [{lo}, {hi}]")
        if not 0.0 <= self.light_jitter <= 90.0:
            raise ValueError(f"Viewpoints.light_jitter must lie in [0, 90] degrees, got {self.light_jitter}")

    def specs(self, rng: np.random.Generator, n: int) -> list[RenderSpec]:
        """``n`` one-view render specs for one object, drawn from ``rng``."""
        base = self.spec
        if self.kind == "fixed":
            grid = [(a, e) for e in base.elevations for a in base.azimuths]  # elevation-major, as prepare
            if n > len(grid):
                raise ValueError(f"{n} views asked of a fixed grid of {len(grid)}")
            chosen = rng.choice(len(grid), size=n, replace=False)
            return [replace(base, azimuths=(grid[i][0],), elevations=(grid[i][1],)) for i in chosen]
        az = rng.uniform(*self.azimuth, size=n)
        el = rng.uniform(*self.elevation, size=n)
        zoom = rng.uniform(*self.zoom, size=n)
        lights = [jittered(base.light, self.light_jitter, rng) for _ in range(n)]
        return [
            replace(
                base,
                azimuths=(float(az[i]),),
                elevations=(float(el[i]),),
                zoom=float(zoom[i]),
                light=lights[i],
            )
            for i in range(n)
        ]


def jittered(
    light: tuple[float, float, float], degrees: float, rng: np.random.Generator
) -> tuple[float, float, float]:
    """``light`` turned by an angle uniform in ``[0, degrees]`` about a random axis (unit length)."""
    v = np.asarray(light, dtype=np.float64)
    v = v / np.linalg.norm(v)
    if degrees == 0:
        return (float(v[0]), float(v[1]), float(v[2]))
    axis = np.cross(v, rng.normal(size=3))
    axis /= max(float(np.linalg.norm(axis)), 1e-12)
    angle = np.deg2rad(rng.uniform(0.0, degrees))
    # Rodrigues' rotation of v about an axis perpendicular to it.
    out = v * np.cos(angle) + np.cross(axis, v) * np.sin(angle)
    return (float(out[0]), float(out[1]), float(out[2]))


def object_rng(seed: int, epoch: int, object_id: str) -> np.random.Generator:
    """The generator of one object's viewpoints in one epoch: a function of these three alone (the id by 64
    bits of its SHA-256: a 32-bit hash would give ~75 pairs of an 800k-object corpus the same views)."""
    digest = int.from_bytes(hashlib.sha256(object_id.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, epoch, digest, VIEWPOINT_STREAM])


def render_object(
    specs: list[RenderSpec],
    points: np.ndarray,
    mesh: tuple[np.ndarray, np.ndarray] | None,
    size: int | None = None,
) -> np.ndarray:
    """``[len(specs), size, size, 3]`` uint8: one view per spec, of ``mesh`` (shaded triangles) when given
    and not ``points_only``, else splats of ``points``; resized (bilinear) to ``size`` when it differs
    from the specs' size."""
    views = []
    for spec in specs:
        if mesh is not None and not spec.points_only:
            img = render_mesh(*mesh, spec)[0]
        else:
            img = render_views(points, spec)[0]
        if size is not None and size != spec.size:
            img = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))
        views.append(img)
    return np.stack(views)
