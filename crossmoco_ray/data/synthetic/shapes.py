"""Surfaces for the synthetic datasets: triangle meshes of parts (boxes, surfaces of revolution) for the
objects of :mod:`.objects`, area-uniform sampling of meshes, and the disk/tube samplers of the part set.

Points are spread uniformly by area (:func:`sample_mesh` picks triangles in proportion to their areas).
Otherwise the point density, which a network can read trivially, would tell classes apart (e.g. a
cylinder's caps would be denser than its side).
"""

from __future__ import annotations

import itertools

import numpy as np

TAU = 2.0 * np.pi


def disk(k: int, rng: np.random.Generator, r_in: float, r_out: float, y: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the annulus ``r_in <= r <= r_out`` in the plane at height ``y``.

    ``r = sqrt(uniform(r_in², r_out²))`` makes the density uniform by area (a full disk is ``r_in = 0``).
    """
    r = np.sqrt(rng.uniform(r_in**2, r_out**2, k))
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), np.full(k, y), r * np.sin(t)], axis=1)


def tube(k: int, rng: np.random.Generator, r: float, y0: float, y1: float) -> np.ndarray:
    """``[k, 3]`` points uniform on the side of the cylinder of radius ``r`` between heights y0 and y1."""
    t = rng.uniform(0.0, TAU, k)
    return np.stack([r * np.cos(t), rng.uniform(y0, y1, k), r * np.sin(t)], axis=1)


def sample_mesh(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, 3]`` points uniform by area on a triangle mesh (``vertices [V, 3]``, ``faces [F, 3]`` int).

    Degenerate (zero-area) triangles are never picked, so fans may include them.
    """
    tri = vertices[faces]  # [F, 3, 3]
    e1, e2 = tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]
    area = 0.5 * np.linalg.norm(np.cross(e1, e2), axis=1)
    f = rng.choice(len(faces), size=n, p=area / area.sum())
    u, v = rng.random(n), rng.random(n)
    # Folding the unit square onto the triangle keeps the barycentric draw uniform.
    flip = u + v > 1.0
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    return tri[f, 0] + u[:, None] * e1[f] + v[:, None] * e2[f]


# ---- triangle meshes of the synthetic objects' parts ------------------------------------------------------

SIDES = 24  # segments around a surface of revolution
STEP = 0.25  # longest edge along a profile or a box face, so the deformations bend parts smoothly

Mesh = tuple[np.ndarray, np.ndarray]  # vertices [V, 3] float64, faces [F, 3] int64


def merge_meshes(parts: list[Mesh]) -> Mesh:
    """One mesh of several (faces re-indexed); parts may intersect, as an object's parts do."""
    offsets = np.cumsum([0] + [len(v) for v, _ in parts[:-1]])
    vertices = np.concatenate([v for v, _ in parts])
    faces = np.concatenate([f + o for (_, f), o in zip(parts, offsets, strict=True)])
    return vertices, faces


def _refine(profile: np.ndarray, closed: bool) -> np.ndarray:
    """``profile [P, 2]`` with points inserted so that no segment is longer than ``STEP``."""
    pts = np.vstack([profile, profile[:1]]) if closed else profile
    out = []
    for a, b in itertools.pairwise(pts):
        k = max(1, int(np.ceil(np.linalg.norm(b - a) / STEP)))
        out.append(a + (b - a) * (np.arange(k)[:, None] / k))
    if not closed:
        out.append(pts[-1:])
    return np.concatenate(out)


def lathe_mesh(profile: np.ndarray, closed: bool = False, sides: int = SIDES) -> Mesh:
    """The surface swept by a profile ``[P, 2]`` of ``(radius, y)`` turning about the y axis.

    A profile point at radius 0 closes the surface there (a cap's centre: its triangles are degenerate and
    harmless); ``closed`` joins the last profile point to the first (a torus's tube).
    """
    prof = _refine(np.asarray(profile, dtype=np.float64), closed)
    p = len(prof)
    a = TAU * np.arange(sides) / sides
    ring = np.stack([np.cos(a), np.sin(a)], axis=1)  # [S, 2]
    radius, height = prof[:, None, 0], np.broadcast_to(prof[:, None, 1], (p, sides))
    vertices = np.stack([radius * ring[:, 0], height, radius * ring[:, 1]], axis=-1).reshape(-1, 3)
    rows = p if closed else p - 1
    grid_i, grid_j = np.meshgrid(np.arange(rows), np.arange(sides), indexing="ij")
    i, j = grid_i.ravel(), grid_j.ravel()
    i1, j1 = (i + 1) % p, (j + 1) % sides
    a0, b0, a1, b1 = i * sides + j, i * sides + j1, i1 * sides + j, i1 * sides + j1
    faces = np.concatenate([np.stack([a0, b0, b1], axis=1), np.stack([a0, b1, a1], axis=1)])
    return vertices, faces


def box_mesh(half: tuple[float, float, float]) -> Mesh:
    """A closed box ``[-half, half]`` whose faces are grids of squares no longer than ``STEP`` a side."""
    h = np.asarray(half, dtype=np.float64)
    counts = [max(1, int(np.ceil(2 * x / STEP))) for x in h]
    parts = []
    for axis in range(3):
        u, v = [a for a in range(3) if a != axis]
        gu = np.linspace(-h[u], h[u], counts[u] + 1)
        gv = np.linspace(-h[v], h[v], counts[v] + 1)
        uu, vv = np.meshgrid(gu, gv, indexing="ij")
        nu, nv = uu.shape
        i, j = np.meshgrid(np.arange(nu - 1), np.arange(nv - 1), indexing="ij")
        q = (i * nv + j).ravel()
        faces = np.concatenate(
            [np.stack([q, q + nv, q + nv + 1], axis=1), np.stack([q, q + nv + 1, q + 1], axis=1)]
        )
        for sign in (-1.0, 1.0):
            verts = np.zeros((nu * nv, 3))
            verts[:, u], verts[:, v], verts[:, axis] = uu.ravel(), vv.ravel(), sign * h[axis]
            parts.append((verts, faces))
    return merge_meshes(parts)
