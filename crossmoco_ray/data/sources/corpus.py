"""``corpus``: a folder tree of object files with no classes, e.g. Objaverse's ``glbs/000-023/<uid>.glb``.

Every point or mesh file anywhere below the root (``.ply .npy .xyz .txt``, ``.off .obj .stl .glb .gltf``;
:mod:`.objects`) is one unlabelled object (label −1 in the shards), in one split, ``train``
(``--val-fraction`` carves ``val`` from it). An object's id is its path below the root, suffix included
(``000-023/8476c4170df24cf5bbe6967222d1a42d.glb``), so ids are unique whenever paths are. Folders and files
whose names start with ``.`` are passed over, symbolic links to folders are not followed (a link loop
cannot make the walk endless), and only regular files are read.

It is chosen explicitly (``--format corpus``): a tree of sub-folders looks like class folders, and guessing
it wrong would give every Objaverse sub-folder (``000-023``) a class. Tasks of ``prepare --ray`` are runs of
:data:`TASK_FILES` files of the sorted listing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source, decodable, file_identity, regular_file
from crossmoco_ray.data.sources.mesh import MESH_SUFFIXES, folder_reader
from crossmoco_ray.data.sources.objects import (
    FILE_BYTES,
    OBJECT_SUFFIXES,
    Sampling,
    declares_faces,
    object_sample,
)
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

TASK_FILES = 32  # files per task of prepare --ray
NOT_UTF8 = "its name is not valid UTF-8 (ids are stored as text): rename it"
PLY_PROBES = 16  # .ply files whose headers are read to tell whether a corpus of .ply files holds meshes


def read_local(path: Path, where: str) -> bytes:
    """The bytes of a local object file: a regular file (no FIFO, device or loop) of at most
    :data:`.objects.FILE_BYTES`."""
    if not regular_file(path):
        raise DataError(where, "missing, or not a regular file")
    try:
        if path.stat().st_size > FILE_BYTES:
            raise DataError(where, f"file over {FILE_BYTES // 1024**2} MiB")
        return path.read_bytes()
    except OSError as err:
        raise DataError(where, f"cannot read file ({printable(err.strerror or err)})") from None


def ply_has_faces(data: bytes, where: str) -> bool:
    try:
        return declares_faces(data, where)
    except DataError:
        return False


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class CorpusSource(Source):
    """Every object file below ``root``, unlabelled, in one split (``train``).

    Args:
        root: the folder.
        sampling: the up axis and how points are drawn on meshes.
    """

    format = "corpus"

    def __init__(self, root: str | Path, sampling: Sampling | None = None) -> None:
        self.root, self.sampling = Path(root), sampling or Sampling()
        self._has_meshes: bool | None = None
        if not self.root.is_dir():
            raise DataError(printable(self.root), "not a directory (--format corpus reads a folder tree)")
        self.files = self._walk()
        if not self.files:
            raise DataError(
                printable(self.root),
                f"no point or mesh files ({' '.join(OBJECT_SUFFIXES)}) anywhere below it",
            )

    def _walk(self) -> list[str]:
        """Paths below the root (POSIX, sorted) of every object file, named as they are on disk."""
        out = []
        for folder, dirs, names in os.walk(self.root, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            base = Path(folder)
            for name in sorted(names):
                path = base / name
                if not name.startswith(".") and path.suffix.lower() in OBJECT_SUFFIXES and regular_file(path):
                    out.append(path.relative_to(self.root).as_posix())
        return out

    def splits(self) -> list[str]:
        return ["train"]

    def count(self, split: str) -> int | None:
        return len(self.files)

    def has_meshes(self) -> bool:
        if self._has_meshes is None:
            suffixes = [Path(f).suffix.lower() for f in self.files]
            plys = [f for f, s in zip(self.files, suffixes, strict=True) if s == ".ply"][:PLY_PROBES]
            self._has_meshes = any(s in MESH_SUFFIXES for s in suffixes) or any(
                ply_has_faces(_head(self.root / f), f) for f in plys
            )
        return self._has_meshes

    def identity(self) -> dict[str, Any]:
        s = self.sampling
        out: dict[str, Any] = {
            "format": self.format,
            "up_axis": s.up_axis,
            "files": file_identity([self.root / f for f in self.files]),
        }
        if self.has_meshes():
            out["mesh_sampling"] = {"points": s.mesh_points, "seed": s.seed, "fps": s.fps}
        return out

    def tasks(self, split: str) -> list[Any]:
        return chunks(self.files, TASK_FILES)

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        for rel in task:
            yield self.read(split, rel)

    def read(self, split: str, rel: str) -> Sample | DataError:
        """The sample of the file ``rel`` below the root (or the :class:`DataError` naming it)."""
        path = self.root / rel
        where = printable(path)
        if not decodable(path, self.root):
            return DataError(where, NOT_UTF8)
        try:
            data = read_local(path, where)
            return object_sample(
                data,
                path.suffix.lower(),
                where,
                rel,
                None,
                split,
                self.sampling,
                folder_reader(path.parent, where),
            )
        except DataError as err:
            return err


def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 16)
    except OSError:
        return b""
