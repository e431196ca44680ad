"""The cameras shared by the point renderer (:mod:`.render`) and the mesh renderer (:mod:`.raster`).

Camera convention (in a frame where the ``up_axis`` is "up"): azimuth 0 looks from the +z side of a
y-up object (x to the right), azimuths turn the camera about the up axis, elevations raise it above the
horizon; the projection is orthographic and the up axis points to image row 0 (the top). Objects are
centred on their bounding box and scaled to unit radius first, so position and scale do not change images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

FILL = 0.9  # fraction of the image side spanned by the unit sphere the cloud is scaled into

# Bounds of a RenderSpec, so that a typo (size=100000) fails at once with its reason instead of asking for
# tens of GiB: the mesh renderer holds a z-buffer and an owner per supersampled pixel (16 bytes each), so
# (size · supersample)² stays ≤ 8192² (1 GiB); views are rendered and kept per object.
MIN_SIZE, MAX_SIZE = 8, 4096
MAX_SUPERSAMPLED = 8192
MAX_VIEWS = 256
MIN_ZOOM, MAX_ZOOM = 0.25, 4.0

# Proper rotations taking the named up axis of the data to +y, so one camera convention serves all.
TO_Y_UP: dict[str, np.ndarray] = {
    "y": np.eye(3),
    "z": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]),  # (x, y, z) -> (x, z, -y)
    "x": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),  # (x, y, z) -> (-y, x, z)
}


@dataclass(frozen=True)
class RenderSpec:
    """Which views to render and how.

    Attributes:
        azimuths: camera angles about the up axis, degrees.
        elevations: camera angles above the horizon, degrees; views are ordered elevation-major.
        size: side of the square images, pixels.
        point_size: side of the square splat of one point, pixels.
        mode: how points look: ``"shaded"``: grey, lit by their estimated normals (Lambertian +
            ambient, as meshes are); ``"depth"``: grey, nearer is brighter; ``"coords"``: RGB = the
            normalised coordinates (in the up-is-y frame: R = x, G = up, B = z). Meshes are always shaded.
        up_axis: the axis of the data that points up in the images.
        light: direction towards the light in the camera frame (right, up, towards camera); it moves with
            the camera, so every view is lit alike. The default comes from the upper left of the viewer.
        ambient: share of light every surface gets whatever its slant (0..1).
        supersample: mesh renders: samples per pixel along each axis (anti-aliasing; 1 = none).
        normal_neighbours: shaded points: neighbours per point for the normal estimate.
        points_only: render splats of the points (in ``mode``) even for objects that come with a mesh
            (what every source got before meshes were read; for A/B comparisons of the renders).
        zoom: scale of the object in the image: the unit sphere spans ``FILL · zoom`` of the side (the
            orthographic camera's "distance"; fresh viewpoints jitter it, :mod:`.viewpoints`).
    """

    azimuths: tuple[float, ...] = (0.0, 60.0, 120.0, 180.0, 240.0, 300.0)
    elevations: tuple[float, ...] = (20.0,)
    size: int = 128
    point_size: int = 2
    mode: Literal["shaded", "depth", "coords"] = "depth"
    up_axis: Literal["x", "y", "z"] = "y"
    light: tuple[float, float, float] = (-0.4, 0.5, 1.0)
    ambient: float = 0.25
    supersample: int = 2
    normal_neighbours: int = 16
    points_only: bool = False
    zoom: float = 1.0

    def __post_init__(self) -> None:
        for name in ("azimuths", "elevations"):
            angles = getattr(self, name)
            if len(angles) == 0:
                raise ValueError(f"RenderSpec needs at least one {name[:-1]}")
            try:
                finite = np.isfinite(np.asarray(angles, dtype=np.float64)).all()
            except (TypeError, ValueError):
                raise ValueError(
                    f"RenderSpec.{name} must be numbers (degrees), got {angles!r:.200}"
                ) from None
            if not finite:  # a NaN angle renders a black view (every coordinate becomes NaN)
                raise ValueError(f"RenderSpec.{name} must be finite (degrees), got {angles!r:.200}")
        if self.num_views > MAX_VIEWS:
            raise ValueError(f"RenderSpec asks for {self.num_views} views; at most {MAX_VIEWS}")
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(
                f"RenderSpec.size must be at least {MIN_SIZE} and at most {MAX_SIZE} pixels, got {self.size}"
            )
        if not 1 <= self.point_size <= self.size:
            raise ValueError(
                f"RenderSpec.point_size must be at least 1 pixel (and at most size), got {self.point_size}"
            )
        if self.mode not in ("shaded", "depth", "coords"):
            raise ValueError(f"RenderSpec.mode must be 'shaded', 'depth' or 'coords', got {self.mode!r}")
        if len(self.light) != 3 or not np.isfinite(self.light).all() or not np.any(self.light):
            raise ValueError(f"RenderSpec.light must be a non-zero 3-vector, got {self.light!r}")
        if not 0.0 <= self.ambient <= 1.0:
            raise ValueError(f"RenderSpec.ambient must lie in [0, 1], got {self.ambient}")
        if self.supersample < 1 or self.size * self.supersample > MAX_SUPERSAMPLED:
            raise ValueError(
                f"RenderSpec.supersample must be at least 1 with size × supersample ≤ {MAX_SUPERSAMPLED}, "
                f"got {self.supersample} at size {self.size}"
            )
        if self.normal_neighbours < 3:
            raise ValueError(f"RenderSpec.normal_neighbours must be at least 3, got {self.normal_neighbours}")
        if not (np.isfinite(self.zoom) and MIN_ZOOM <= self.zoom <= MAX_ZOOM):
            raise ValueError(f"RenderSpec.zoom must lie in [{MIN_ZOOM}, {MAX_ZOOM}], got {self.zoom!r:.50}")
        if self.up_axis not in TO_Y_UP:
            raise ValueError(f"RenderSpec.up_axis must be 'x', 'y' or 'z', got {self.up_axis!r}")

    @property
    def num_views(self) -> int:
        return len(self.azimuths) * len(self.elevations)

    def pixels_per_unit(self, size: int | None = None) -> float:
        """Pixels per unit of the normalised object along an image axis at ``size`` (default: ``size``)."""
        return FILL * self.zoom * (self.size if size is None else size) / 2


def camera_rotations(spec: RenderSpec) -> np.ndarray:
    """``[V, 3, 3]``: rows are the camera's right, up and towards-camera axes, in the data's frame."""
    az = np.deg2rad(np.asarray(spec.azimuths, dtype=np.float64))[None, :]
    el = np.deg2rad(np.asarray(spec.elevations, dtype=np.float64))[:, None]
    az, el = np.broadcast_arrays(az, el)  # [E, A]: elevation-major once flattened
    az, el = az.ravel(), el.ravel()
    zero = np.zeros_like(az)
    # In the y-up frame the camera sits at (sin az cos el, sin el, cos az cos el), looking at the origin.
    right = np.stack([np.cos(az), zero, -np.sin(az)], axis=-1)
    up = np.stack([-np.sin(el) * np.sin(az), np.cos(el), -np.sin(el) * np.cos(az)], axis=-1)
    back = np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], axis=-1)
    rot = np.stack([right, up, back], axis=1) @ TO_Y_UP[spec.up_axis]
    # cos(90°) is 6e-17, not 0: snap such residues so that right angles rotate exactly and points on
    # the centre line do not fall on either side of the central pixel edge by rounding luck.
    rot[np.abs(rot) < 1e-12] = 0.0
    return rot


def normalise(points: np.ndarray) -> np.ndarray:
    """``[N, 3]`` float64: the cloud centred on its bounding-box centre and scaled to unit radius."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"points must have shape [N, 3], got {pts.shape}")
    if len(pts) == 0:
        return pts
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite values")
    # The bounding-box centre (not the mean) so that uneven sampling density does not shift the object.
    pts = pts - (pts.min(axis=0) + pts.max(axis=0)) / 2
    radius = np.sqrt((pts**2).sum(axis=1).max())
    return pts / radius if radius > 0 else pts
