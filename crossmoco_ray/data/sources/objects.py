"""One object file's bytes → a :class:`Sample`: what corpora and file lists read (:mod:`.corpus`), whether the
file came from a local path or a URI (``s3://``, ``gs://``) through ``pyarrow.fs``.

The file is read whole, bounded by :data:`FILE_BYTES` before it is read, then parsed from memory: points
(``.ply`` without faces, ``.npy``, ``.xyz``, ``.txt``) or meshes (``.off .obj .stl .glb .gltf``, ``.ply``
with faces; :mod:`.mesh`), with the same checks as the class-folder reader.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import UpAxis, to_y_up
from crossmoco_ray.data.sources.folders import TEXT_BYTES, check_npy_claims, npy_header
from crossmoco_ray.data.sources.gltf import Sibling
from crossmoco_ray.data.sources.mesh import MESH_BYTES, MESH_SUFFIXES, mesh_from_bytes, surface_points
from crossmoco_ray.data.sources.ply import ply_points
from crossmoco_ray.data.sources.ply_header import parse_header
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

POINT_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")
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


def points_from_bytes(data: bytes, suffix: str, where: str) -> np.ndarray:
    """``[N, 3]`` float32 of a point file's bytes (``.ply``, ``.npy`` first 3 columns, ``.xyz``/``.txt``)."""
    if suffix == ".ply":
        return ply_points(data, where)
    try:
        if suffix == ".npy":
            fp = io.BytesIO(data)
            shape, dtype = npy_header(fp, where)
            if not check_npy_claims(shape, dtype, len(data) - fp.tell(), where):
                return np.zeros((shape[0], 3), np.float32)
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        else:
            if len(data) > TEXT_BYTES:
                raise DataError(
                    where, f"text point file over {TEXT_BYTES // 1024**2} MiB: save it as .npy or .ply"
                )
            text = data.decode("latin-1").replace(",", " ")
            if not text.strip():
                raise DataError(where, "empty point file")
            arr = np.loadtxt(text.splitlines(), dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(where, f"unreadable point file: {printable(err, 300)}") from None
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise DataError(where, f"points must be [N, 3] (or more columns), got {tuple(arr.shape)}")
    with np.errstate(over="ignore"):  # float64 beyond float32 becomes inf: named by the checks
        return np.ascontiguousarray(arr[:, :3], dtype=np.float32)


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
