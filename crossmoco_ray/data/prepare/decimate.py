"""Meshes to a face budget, for ``prepare --store meshes``: what is stored is what training renders.

Objaverse-like corpora hold meshes from a few hundred to millions of faces; a shard cell and a render cost
grow with the faces, while a 224-px view shows a few thousand at most. Meshes over the budget are decimated
by quadric edge collapse with `fast-simplification <https://github.com/pyvista/fast-simplification>`_ (a
small compiled wheel of the pyvista project: Garland-Heckbert quadrics, ~50 ms for 80k → 20k faces), which
keeps silhouettes and creases that vertex clustering would round off. Meshes within the budget are stored
as they are. The budget is a target, not a cap: the collapse reaches it on connected surfaces, while a mesh
made of many small separate parts (a grid of boxes) stops where no edge can collapse without tearing a part,
and is stored with what is left.
"""

from __future__ import annotations

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.errors import DataError


def decimated(
    mesh: tuple[np.ndarray, np.ndarray], max_faces: int, source: str = "", index: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``mesh`` (vertices ``[V, 3]``, faces ``[F, 3]``) decimated towards ``max_faces`` faces."""
    vertices, faces = mesh
    if len(faces) <= max_faces:
        return vertices, faces
    import fast_simplification  # imported here: only meshes over the budget need it

    verts, tris = vertices, faces
    for _ in range(2):  # a second pass gets closer where the first stopped short (parts it could not join)
        try:
            verts, tris = fast_simplification.simplify(
                np.ascontiguousarray(verts, dtype=np.float32),
                np.ascontiguousarray(tris, dtype=np.int32),
                target_count=max_faces,
            )
        except Exception as err:  # a compiled library's errors are of many types
            raise DataError(source, f"mesh decimation failed: {printable(err, 200)}", index) from None
        tris = np.asarray(tris, dtype=np.int64).reshape(-1, 3)
        if len(tris) <= max_faces:
            break
    if len(tris) == 0:
        raise DataError(source, f"mesh decimated to no faces (from {len(faces)})", index)
    return np.asarray(verts, dtype=np.float64), tris
