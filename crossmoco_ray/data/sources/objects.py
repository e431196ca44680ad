"""One object file's bytes → a :class:`Sample`: what corpora and file lists read (:mod:`.corpus`), whether the
file came from a local path or a URI (``s3://``, ``gs://``) through ``pyarrow.fs``.

The file is read whole, bounded by :data:`FILE_BYTES` before it is read, then parsed from memory: points
(``.ply`` without faces, ``.npy``, ``.xyz``, ``.txt``) or meshes (``.off .obj .stl .glb .gltf``, ``.ply``
with faces; :mod:`.mesh`), with the same checks as the class-folder reader.
"""

from __future__ import annotations

from dataclasses import dataclass

from crossmoco_ray.data.sources.base import UpAxis, to_y_up
from crossmoco_ray.data.sources.folders import POINT_SUFFIXES, points_from_bytes
from crossmoco_ray.data.sources.gltf import Sibling
from crossmoco_ray.data.sources.mesh import MESH_BYTES, MESH_SUFFIXES, mesh_from_bytes, surface_points
from crossmoco_ray.data.sources.ply_header import parse_header
from crossmoco_ray.data.sources.sample import Sample

OBJECT_SUFFIXES = POINT_SUFFIXES + MESH_SUFFIXES
FILE_BYTES = MESH_BYTES  # an object file larger than this is refused before it is read


@dataclass(frozen=True)
class Sampling:
    """How objects become points: the up axis, and points sampled on meshes (seeded per object)."""

    up_axis: UpAxis = "y"
    mesh_points: int = 2048
    seed: int = 0
    fps: bool = False


def declares_faces(data: bytes, source: str) -> bool:
    """Whether a PLY file's header declares faces (it is then a mesh)."""
    _, elements, _ = parse_header(data[: 1 << 16], source)
    return sum(e.count for e in elements if e.name == "face") > 0


def object_sample(
    data: bytes,
    suffix: str,
    where: str,
    sample_id: str,
    label: int | None,
    split: str,
    sampling: Sampling,
    sibling: Sibling | None = None,
) -> Sample:
    """The sample of one object file's bytes (``suffix`` lower-case: the format; ``where`` names it in
    errors; ``sibling`` reads a ``.gltf``'s external buffers), or a :class:`DataError`."""
    if suffix in MESH_SUFFIXES or (suffix == ".ply" and declares_faces(data, where)):
        vertices, faces = mesh_from_bytes(data, suffix, where, sibling)
        vertices = to_y_up(vertices, sampling.up_axis)
        mesh = (vertices, faces)
        points = surface_points(mesh, sampling.mesh_points, sample_id, sampling.seed, sampling.fps)
        return Sample(sample_id, points, None, label, where, 0, split, mesh=mesh)
    points = to_y_up(points_from_bytes(data, suffix, where), sampling.up_axis)
    return Sample(sample_id, points, None, label, where, 0, split)
