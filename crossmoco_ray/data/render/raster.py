"""Shaded renders of triangle meshes, and normals estimated from points: images made from geometry.

:func:`render_mesh` rasterises triangles with a z-buffer and Lambertian + ambient shading, from the views of a
:class:`~.render.RenderSpec` (the same cameras, framing and up axis as the point renderer), on the CPU: no
OpenGL, no display, so it runs on any CPU node of a cluster. Edges are anti-aliased by supersampling
(``spec.supersample``² samples per pixel, box-filtered). Two implementations give the same images:

- **compiled** (``_raster.c``, the default): a plain triangle loop over each bounding box, built at first use
  by the system's C compiler and cached like the kNN kernels (:mod:`crossmoco_ray.nn.native`). It repeats the
  numpy path's arithmetic in the same order, so coverage and depth tests decide alike; one thread per call
  unless ``threads`` asks for more (views are split over them).
- **numpy**: vectorised over triangles: every (triangle, pixel of its bounding box) pair of a view is tested
  at once, in chunks that bound memory, and the z-buffer keeps the nearest surface per pixel with
  ``np.maximum.at``. It runs where the library cannot be built (no compiler: one warning per process) or when
  ``CROSSMOCO_RASTER=numpy`` asks for it.

Shading is flat (one normal per triangle) and two-sided (``|n · l|``): mesh collections have inconsistent
windings and open, non-manifold surfaces, whose back faces must not render black. The light is fixed to the
camera (``spec.light``, a direction in the camera frame), so every view of an object is lit alike and a
face's grey tells its slant towards the viewer: ``ambient + (1 − ambient) · |n · l|``, scaled to
``SHADE_RANGE``.

:func:`estimate_normals` gives point clouds the same cue: the normal of a point is the direction of least
spread of its ``k`` nearest neighbours (PCA), which :func:`~.render.render_views` uses to shade splats
(``mode="shaded"``).
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import TYPE_CHECKING

import numpy as np

from crossmoco_ray.data.render.camera import RenderSpec, camera_rotations, normalise

if TYPE_CHECKING:
    from crossmoco_ray.nn.native import NativeLibrary

SHADE_RANGE = (30, 255)  # grey of intensity 0 and 1; the background stays 0
CHUNK = 1 << 13  # (triangle, pixel) candidates at once: 64 KB temporaries, in cache and not mmapped


def unit_light(spec: RenderSpec) -> np.ndarray:
    """The light direction of ``spec`` in the camera frame (right, up, towards camera), unit length."""
    light = np.asarray(spec.light, dtype=np.float64)
    return light / np.linalg.norm(light)


def intensity(normals_cam: np.ndarray, spec: RenderSpec) -> np.ndarray:
    """Grey levels (uint8, in ``SHADE_RANGE``) of surfaces with unit normals ``[..., 3]`` (camera frame)."""
    lam = np.abs(normals_cam @ unit_light(spec))
    shade = spec.ambient + (1.0 - spec.ambient) * lam
    lo, hi = SHADE_RANGE
    return np.rint(lo + shade * (hi - lo)).clip(lo, hi).astype(np.uint8)


def render_mesh(vertices: np.ndarray, faces: np.ndarray, spec: RenderSpec, threads: int = 1) -> np.ndarray:
    """Render a triangle mesh from every view of ``spec``, shaded.

    Args:
        vertices: ``[V, 3]`` positions, any real dtype, position and scale (normalised here like clouds:
            bounding-box centre, unit radius).
        faces: ``[F, 3]`` vertex indices; degenerate triangles are skipped, winding is ignored.
        spec: the views; ``mode`` is ignored (meshes are always shaded), ``point_size`` too.
        threads: threads of the compiled rasteriser (views are split over them); 1 suits a data pipeline
            that already runs one render task per CPU. The numpy path ignores it.

    Returns:
        ``[V, size, size, 3]`` uint8 grey images, background 0, surfaces in ``SHADE_RANGE`` (edges blend
        into the background by anti-aliasing).
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    faces = np.asarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape [F, 3], got {faces.shape}")
    verts = normalise(vertices)
    if len(faces) and (faces.min() < 0 or faces.max() >= len(verts)):
        raise ValueError(f"face indices must lie in 0..{len(verts) - 1}")
    S, ss = spec.size, spec.supersample
    images = np.zeros((spec.num_views, S, S, 3), dtype=np.uint8)
    if len(faces) == 0:
        return images
    lib = _compiled()
    if lib is not None:
        _render_compiled(lib, verts, faces, spec, images, threads)
        return images
    for v, rot in enumerate(camera_rotations(spec)):
        grey = _rasterise(verts @ rot.T, faces, S * ss, spec)  # [S·ss, S·ss] float
        grey = grey.reshape(S, ss, S, ss).mean(axis=(1, 3))  # box filter: anti-aliased edges
        images[v] = np.rint(grey).astype(np.uint8)[..., None]
    return images


FORCE_NUMPY_ENV = "CROSSMOCO_RASTER"  # =numpy: render with the numpy path
_library: NativeLibrary | None = None
_library_lock = threading.Lock()


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare ``raster_view``'s signature (ctypes would otherwise pass 64-bit values as C ints)."""
    i64, ptr, f64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_double
    lib.raster_view.argtypes = [ptr, i64, ptr, i64, i64, i64, f64, ptr, f64, f64, f64, ptr, ptr, ptr]
    lib.raster_view.restype = ctypes.c_int
    return lib


def _compiled() -> ctypes.CDLL | None:
    """The compiled rasteriser, built at the first call; ``None`` if forced off or it cannot be had."""
    global _library
    if os.environ.get(FORCE_NUMPY_ENV, "").lower() == "numpy":
        return None  # before the builder is imported or anything compiled
    with _library_lock:
        if _library is None:
            from crossmoco_ray.nn.native import NativeLibrary

            _library = NativeLibrary(
                package="crossmoco_ray.data.render",
                source="_raster.c",
                name="raster",
                what="mesh rasteriser",
                plural=False,
                fallback="meshes are rendered by the numpy rasteriser, about 10x slower, to the same images.",
                bind=_bind,
                force_env=FORCE_NUMPY_ENV,
                force_value="numpy",
            )
    return _library.load()


def backend() -> str:
    """``"compiled"`` or ``"numpy"``: what :func:`render_mesh` runs on in this process now."""
    return "compiled" if _compiled() is not None else "numpy"


_scratch_of_thread = threading.local()
KEEP_SCRATCH = 2048  # supersampled sides up to this keep their buffers (≤ 37 MB a thread) between calls


def _scratch(n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's z-buffer and grey samples for an ``n × n`` image (contents undefined).

    Kept between calls: fresh buffers of a few MB are fresh pages from the system, whose first touch
    costs as much as clearing them."""
    have = getattr(_scratch_of_thread, "buffers", None)
    if have is not None and len(have[1]) == n * n:
        return have
    buffers = np.empty(n * n), np.empty(n * n, dtype=np.uint8)
    _scratch_of_thread.buffers = buffers if n <= KEEP_SCRATCH else None
    return buffers


def _render_compiled(
    lib: ctypes.CDLL, verts: np.ndarray, faces: np.ndarray, spec: RenderSpec, images: np.ndarray, threads: int
) -> None:
    """Every view of ``spec`` into ``images [V, S, S, 3]`` by ``_raster.c``, views split over ``threads``."""
    rotations = camera_rotations(spec)
    n = spec.size * spec.supersample
    threads = min(threads, len(rotations))
    light = unit_light(spec)
    scale = spec.pixels_per_unit(n)
    lo, hi = SHADE_RANGE
    faces = np.ascontiguousarray(faces)
    assert images.flags.c_contiguous
    assert images.dtype == np.uint8

    def views(slot: int) -> None:
        zbuf, grey = _scratch(n)
        for v in range(slot, len(rotations), threads):
            cam = np.ascontiguousarray(verts @ rotations[v].T)  # as the numpy path computes it
            err = lib.raster_view(
                cam.ctypes.data, len(cam), faces.ctypes.data, len(faces), spec.size, spec.supersample,
                scale, light.ctypes.data, spec.ambient, float(lo), float(hi),
                zbuf.ctypes.data, grey.ctypes.data, images[v].ctypes.data,
            )  # fmt: skip
            if err:  # checked before the call; the C code checks again rather than read out of bounds
                raise ValueError(f"face indices must lie in 0..{len(cam) - 1}")

    if threads == 1:
        views(0)
    else:
        assert _library is not None
        list(_library.executor(threads).map(views, range(threads)))


def _rasterise(cam: np.ndarray, faces: np.ndarray, size: int, spec: RenderSpec) -> np.ndarray:
    """One view: ``cam [V, 3]`` vertices (camera frame) → ``[size, size]`` grey levels (0 = background)."""
    scale = spec.pixels_per_unit(size)
    # Pixel coordinates: column x grows to the right, row y downwards; pixel (r, c) has its centre at
    # (c + 0.5, r + 0.5).
    px = size / 2 + cam[:, 0] * scale
    py = size / 2 - cam[:, 1] * scale
    tri_x, tri_y, tri_z = px[faces], py[faces], cam[faces, 2]  # [F, 3] each
    # Signed doubled area; degenerate triangles (area ~ 0 in pixels) cover no pixel centre reliably.
    area = (tri_x[:, 1] - tri_x[:, 0]) * (tri_y[:, 2] - tri_y[:, 0]) - (tri_x[:, 2] - tri_x[:, 0]) * (
        tri_y[:, 1] - tri_y[:, 0]
    )
    c0 = np.clip(np.ceil(tri_x.min(axis=1) - 0.5), 0, size).astype(np.int64)
    c1 = np.clip(np.floor(tri_x.max(axis=1) - 0.5), -1, size - 1).astype(np.int64)
    r0 = np.clip(np.ceil(tri_y.min(axis=1) - 0.5), 0, size).astype(np.int64)
    r1 = np.clip(np.floor(tri_y.max(axis=1) - 0.5), -1, size - 1).astype(np.int64)
    width, height = c1 - c0 + 1, r1 - r0 + 1
    keep = (np.abs(area) > 1e-12) & (width > 0) & (height > 0)
    if not keep.any():
        return np.zeros((size, size))
    # From here on, only the triangles that can cover a pixel centre.
    faces, area, c0, r0, width = faces[keep], area[keep], c0[keep], r0[keep], width[keep]
    tri_x, tri_y, tri_z, counts = tri_x[keep], tri_y[keep], tri_z[keep], width * height[keep]

    # Flat two-sided shading per triangle, from its normal in the camera frame.
    normal = np.cross(cam[faces[:, 1]] - cam[faces[:, 0]], cam[faces[:, 2]] - cam[faces[:, 0]])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-30)
    shade = intensity(normal, spec).astype(np.float64)

    # Per triangle, the barycentric weights of vertices b and c and the depth as planes in pixel space
    # (value = u·x + v·y + w), so testing a candidate pixel is three dot products with one row each.
    ax, ay = tri_x[:, 0], tri_y[:, 0]
    bx, by, cx, cy = tri_x[:, 1] - ax, tri_y[:, 1] - ay, tri_x[:, 2] - ax, tri_y[:, 2] - ay
    inv = 1.0 / area
    wb_u, wb_v = cy * inv, -cx * inv  # wb = ((x - ax)·cy − cx·(y − ay)) / area
    wc_u, wc_v = -by * inv, bx * inv  # wc = (bx·(y − ay) − (x − ax)·by) / area
    dz_b, dz_c = tri_z[:, 1] - tri_z[:, 0], tri_z[:, 2] - tri_z[:, 0]
    z_u, z_v = dz_b * wb_u + dz_c * wc_u, dz_b * wb_v + dz_c * wc_v
    planes = np.stack(
        [
            np.stack([wb_u, wb_v, -(wb_u * ax + wb_v * ay)], axis=1),
            np.stack([wc_u, wc_v, -(wc_u * ax + wc_v * ay)], axis=1),
            np.stack([z_u, z_v, tri_z[:, 0] - z_u * ax - z_v * ay], axis=1),
        ],
        axis=1,
    )  # [T, 3 planes, 3 coefficients]

    zbuf = np.full(size * size, -np.inf)
    owner = np.full(size * size, -1, dtype=np.int64)  # the visible triangle per pixel
    # Chunks of triangles whose candidates add up to about CHUNK (a huge triangle gets a chunk alone).
    total = np.cumsum(counts)
    start = 0
    while start < len(counts):
        before = total[start] - counts[start]
        stop = max(start + 1, int(np.searchsorted(total, before + CHUNK, side="right")))
        part = slice(start, stop)
        _fill(planes[part], c0[part], r0[part], width[part], counts[part], start, size, zbuf, owner)
        start = stop
    out = np.zeros(size * size)
    hit = owner >= 0
    out[hit] = shade[owner[hit]]
    return out.reshape(size, size)


def _fill(
    planes: np.ndarray,
    c0: np.ndarray,
    r0: np.ndarray,
    width: np.ndarray,
    counts: np.ndarray,
    first: int,
    size: int,
    zbuf: np.ndarray,
    owner: np.ndarray,
) -> None:
    """Test the bounding-box pixels of a chunk of triangles (numbered from ``first``); update the z-buffer.

    ``planes [T, 3, 3]``: per triangle the barycentric weights of its 2nd and 3rd vertices and its depth
    as ``(u, v, w)`` planes over pixel coordinates; ``c0``, ``r0``, ``width``: first column, first row and
    width of its bounding box; ``counts``: its bounding-box pixel count.
    """
    which = np.repeat(np.arange(len(counts)), counts)  # candidate → triangle of this chunk
    offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    w = width[which]
    row_in, col_in = np.divmod(offset, w)
    col = c0[which] + col_in
    row = r0[which] + row_in
    x, y = col + 0.5, row + 0.5
    p = planes[which]  # [n, 3, 3]: one gather of contiguous rows
    # Barycentric weights; all ≥ 0 inside (for either winding: the area's sign is in the planes).
    wb = p[:, 0, 0] * x + p[:, 0, 1] * y + p[:, 0, 2]
    wc = p[:, 1, 0] * x + p[:, 1, 1] * y + p[:, 1, 2]
    inside = (wb >= 0) & (wc >= 0) & (wb + wc <= 1.0)
    if not inside.any():
        return
    which, p = which[inside], p[inside]
    x, y = x[inside], y[inside]
    z = p[:, 2, 0] * x + p[:, 2, 1] * y + p[:, 2, 2]  # orthographic: depth is linear in pixel space
    pixel = (row * size + col)[inside]
    np.maximum.at(zbuf, pixel, z)
    # Candidates at the new maximum own their pixel; a later chunk overwrites only where it is nearer.
    win = z >= zbuf[pixel]
    owner[pixel[win]] = first + which[win]


def estimate_normals(points: np.ndarray, k: int = 16) -> np.ndarray:
    """Unit normals ``[N, 3]`` of a cloud: per point, the least-spread direction of its ``k`` nearest
    neighbours (itself included). Signs are arbitrary (shading is two-sided)."""
    pts = np.asarray(points, dtype=np.float64)
    n = len(pts)
    if n < 3:
        return np.tile([0.0, 0.0, 1.0], (n, 1))
    k = min(k, n)
    neighbours = np.empty((n, k), dtype=np.int64)
    sq = (pts**2).sum(axis=1)
    step = max(1, (1 << 22) // n)  # rows of the distance matrix at once
    for s in range(0, n, step):
        d = sq[s : s + step, None] - 2.0 * pts[s : s + step] @ pts.T + sq[None, :]
        neighbours[s : s + step] = np.argpartition(d, k - 1, axis=1)[:, :k]
    local = pts[neighbours]  # [N, k, 3]
    local -= local.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", local, local)
    _, vectors = np.linalg.eigh(cov)  # ascending eigenvalues
    return vectors[:, :, 0]
