"""A triangle mesh in one shard cell: what ``prepare --store meshes`` writes and the pipeline renders from.

The cell is a small binary record (the ``mesh`` column of :func:`.manifest.shard_schema`)::

    b"CMM1"  uint32 V  uint32 F  uint8 index bytes (2 or 4)  3 bytes 0
    vertices  [V, 3] float16, little-endian: the mesh centred on its bounding box, scaled to unit radius
    faces     [F, 3] uint16 or uint32, little-endian

Positions are stored normalised because every renderer normalises them anyway (bounding-box centre, unit
radius): nothing an image shows is lost. float16 keeps 11 significant bits — ≤ 5·10⁻⁴ of the radius, a
tenth of a pixel at 224 px with 2×2 supersampling. Faces use 16-bit indices where the vertices allow. A
20,000-face mesh is ~180 KB (zstd barely shrinks it), more than six 224-px PNG views of it (20-75 KB):
storing meshes saves the rendering at prepare and buys new viewpoints every epoch, not bytes (the numbers
and the plan for a large corpus: docs/data.md, bench/RESULTS.md "Scale").

A cell may be crafted (shards are hostile input until checked): :func:`decode_mesh` checks the record's
length against its own counts before reading, bounds the counts (:data:`MAX_MESH_FACES`), and checks every
face index and coordinate, so a damaged cell is a :class:`~crossmoco_ray.errors.DataError` naming the
object, never an out-of-range read in the rasteriser.
"""

from __future__ import annotations

import struct

import numpy as np

from crossmoco_ray.data.render.camera import normalise
from crossmoco_ray.errors import DataError

MAGIC = b"CMM1"
HEADER = struct.Struct("<4sIIB3x")
MAX_MESH_FACES = 1 << 22  # 4M faces: far above any budget (prepare decimates to --mesh-faces)
MAX_MESH_VERTICES = 3 * MAX_MESH_FACES


def encode_mesh(vertices: np.ndarray, faces: np.ndarray) -> bytes:
    """One shard cell of a mesh: ``vertices [V, 3]`` (any frame; normalised here), ``faces [F, 3]``."""
    verts = normalise(np.asarray(vertices, dtype=np.float64)).astype("<f2")
    tri = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(tri) > MAX_MESH_FACES or len(verts) > MAX_MESH_VERTICES:
        raise ValueError(f"a mesh of {len(verts)} vertices and {len(tri)} faces is over the cell's bounds")
    if len(tri) and (tri.min() < 0 or tri.max() >= len(verts)):
        raise ValueError(f"face indices must lie in 0..{len(verts) - 1}")
    width = 2 if len(verts) <= 1 << 16 else 4
    index = tri.astype("<u2" if width == 2 else "<u4")
    return HEADER.pack(MAGIC, len(verts), len(tri), width) + verts.tobytes() + index.tobytes()


def decode_mesh(cell: bytes | memoryview, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [V, 3] float32, faces [F, 3] int64)`` of a cell written by :func:`encode_mesh`.

    Raises:
        DataError: naming ``where`` (the object's id), when the cell is not such a record: wrong magic,
            counts over the bounds or not matching its length, face indices out of range, non-finite or
            out-of-unit-radius coordinates.
    """
    data = memoryview(cell).cast("B")
    if len(data) < HEADER.size:
        raise DataError(where, f"mesh cell of {len(data)} bytes is shorter than its header")
    magic, nv, nf, width = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise DataError(where, "mesh cell has no CMM1 header (not written by prepare --store meshes)")
    if width not in (2, 4) or nv > MAX_MESH_VERTICES or nf > MAX_MESH_FACES:
        raise DataError(
            where, f"mesh cell claims {nv} vertices, {nf} faces, {width}-byte indices: over bounds"
        )
    if nf == 0 or nv < 3:  # prepare never writes one: it would render black views
        raise DataError(where, f"mesh cell with {nf} faces and {nv} vertices: no surface to render")
    want = HEADER.size + nv * 6 + nf * 3 * width
    if len(data) != want:
        raise DataError(where, f"mesh cell is {len(data)} bytes; its counts need {want}")
    verts = np.frombuffer(data, dtype="<f2", count=nv * 3, offset=HEADER.size).reshape(nv, 3)
    faces = np.frombuffer(
        data, dtype="<u2" if width == 2 else "<u4", count=nf * 3, offset=HEADER.size + nv * 6
    )
    faces = faces.astype(np.int64).reshape(nf, 3)
    if nf and int(faces.max()) >= nv:
        raise DataError(where, f"mesh cell has face indices beyond its {nv} vertices")
    out = verts.astype(np.float32)
    if not np.isfinite(out).all() or (nv and float(np.abs(out).max()) > 1.01):
        raise DataError(where, "mesh cell has coordinates that are not finite or not normalised")
    return out, faces
