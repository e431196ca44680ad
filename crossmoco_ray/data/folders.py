"""File-per-object sources: CrossPoint's ShapeNetRender layout and plain class folders.

- ``shapenetrender``: ``ShapeNet/<synset>/<id>.ply`` with ``ShapeNetRendering/<synset>/<id>/rendering/*.png``
  (the views come with the data; nothing is rendered at prepare time).
- ``folder``: one object per file, the class is a folder: ``<root>/[<split>/]<class>/<name>.<ext>`` or
  ModelNet's own layout ``<root>/<class>/<split>/<name>.<ext>`` (as ModelNet40/10 ship). Files are point
  clouds (``.npy``, ``.xyz``, ``.txt``, ``.ply`` without faces) or triangle meshes (``.off``, ``.obj``,
  ``.ply`` with faces; :mod:`.mesh`), which may be mixed. A mesh gives the sample its points (sampled on
  the surface, area-weighted, seeded per object) and is kept on the sample, so its views are shaded renders
  of the mesh rather than of the points.

Files are read one at a time; an unreadable one is yielded as a :class:`DataError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .mesh import MESH_SUFFIXES, is_mesh_file, read_mesh, surface_points
from .ply import read_ply
from .source import Source, UpAxis, file_identity, to_y_up
from .types import DataError, Sample

POINT_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")
SUFFIXES = POINT_SUFFIXES + MESH_SUFFIXES
SPLITS = ("train", "test", "val")


class ShapeNetRenderSource(Source):
    """CrossPoint's layout: ``ShapeNet/<synset>/<id>.ply`` + ``ShapeNetRendering/.../rendering/*.png``."""

    format = "shapenetrender"

    def __init__(self, root: str | Path, up_axis: UpAxis = "y") -> None:
        self.root, self.up_axis = Path(root), up_axis
        self.cloud_dir, self.render_dir = self.root / "ShapeNet", self.root / "ShapeNetRendering"
        for d in (self.cloud_dir, self.render_dir):
            if not d.is_dir():
                raise DataError(
                    str(d), "missing: a ShapeNetRender root holds ShapeNet/ and ShapeNetRendering/"
                )
        self.synsets = sorted(p.name for p in self.cloud_dir.iterdir() if p.is_dir())
        self.clouds = sorted(self.cloud_dir.glob("*/*.ply"))

    def splits(self) -> list[str]:
        return ["train"]

    def class_names(self) -> list[str] | None:
        return self.synsets

    def count(self, split: str) -> int | None:
        return len(self.clouds)

    def has_views(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return {"format": self.format, "up_axis": self.up_axis, "files": file_identity(self.clouds)}

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        for ply in self.clouds:
            yield from self.read_task(split, str(ply))

    def tasks(self, split: str) -> list[Any]:
        return [str(p) for p in self.clouds]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        ply = Path(task)
        try:
            yield self._sample(ply, self.synsets.index(ply.parent.name), split)
        except DataError as err:
            yield err

    def _sample(self, ply: Path, label: int, split: str) -> Sample:
        synset, model = ply.parent.name, ply.stem
        views_dir = self.render_dir / synset / model / "rendering"
        pngs = sorted(views_dir.glob("*.png")) if views_dir.is_dir() else []
        if not pngs:
            raise DataError(str(ply), f"no rendered views: expected PNG files in {views_dir}")
        views = []
        for png in pngs:
            try:
                views.append(png.read_bytes())
            except OSError as err:
                raise DataError(str(png), f"unreadable image: {err}") from err
        points = to_y_up(read_ply(ply), self.up_axis)
        return Sample(f"{synset}/{model}", points, views, label, str(ply), 0, split)


class FolderSource(Source):
    """One object per file, class = a folder: ``<root>/[<split>/]<class>/<name>.<ext>`` or ModelNet's
    ``<root>/<class>/<split>/<name>.<ext>``; points or meshes (:mod:`.mesh`).

    Args:
        root: the folder.
        up_axis: the data's up axis (points and meshes are turned to y-up).
        mesh_points: points sampled on each mesh's surface.
        seed: the sampling seed (each object draws from ``(seed, its id)``).
        fps: farthest-point sampling of the mesh points (from a 4× denser draw) instead of a plain draw.
    """

    format = "folder"

    def __init__(
        self,
        root: str | Path,
        up_axis: UpAxis = "y",
        mesh_points: int = 2048,
        seed: int = 0,
        fps: bool = False,
    ) -> None:
        self.root, self.up_axis = Path(root), up_axis
        self.mesh_points, self.seed, self.fps = mesh_points, seed, fps
        self._has_meshes: bool | None = None
        self._listing: dict[str, list[Path]] = {}
        if not self.root.is_dir():
            raise DataError(str(self.root), "not a directory")
        tops = sorted(d for d in self.root.iterdir() if d.is_dir())
        split_dirs = [d.name for d in tops if d.name in SPLITS]
        # ModelNet's layout: class folders at the top, each holding split folders.
        self.class_major = not split_dirs and any((d / s).is_dir() for d in tops for s in SPLITS)
        self.split_dirs = False
        if self.class_major:
            self.classes = [d.name for d in tops]
            names = {d.name for c in tops for d in c.iterdir() if d.is_dir() and d.name in SPLITS}
            self._splits = [s for s in SPLITS if s in names]
        else:
            self._splits = split_dirs or ["train"]
            self.split_dirs = bool(split_dirs)
            bases = [self.root / s for s in split_dirs] or [self.root]
            self.classes = sorted({c.name for base in bases for c in base.iterdir() if c.is_dir()})
        if not self.classes:
            raise DataError(
                str(self.root), f"no class folders with point or mesh files ({', '.join(SUFFIXES)})"
            )

    def _class_dir(self, split: str, name: str) -> Path:
        if self.class_major:
            return self.root / name / split
        return self.root / split / name if self.split_dirs else self.root / name

    def _files(self, split: str) -> list[Path]:
        """The split's object files, listed once (count, identity, has_meshes and tasks all ask)."""
        if split not in self._listing:
            self._listing[split] = sorted(
                f
                for c in self.classes
                for f in self._class_dir(split, c).glob("*")
                if f.suffix.lower() in SUFFIXES and f.is_file()
            )
        return self._listing[split]

    def splits(self) -> list[str]:
        return list(self._splits)

    def class_names(self) -> list[str] | None:
        return self.classes

    def count(self, split: str) -> int | None:
        return len(self._files(split))

    def identity(self) -> dict[str, Any]:
        files = [f for s in self._splits for f in self._files(s)]
        out: dict[str, Any] = {"format": self.format, "up_axis": self.up_axis, "files": file_identity(files)}
        if self.has_meshes():
            out["mesh_sampling"] = {"points": self.mesh_points, "seed": self.seed, "fps": self.fps}
        return out

    def has_meshes(self) -> bool:
        if self._has_meshes is None:  # reads PLY headers: once
            self._has_meshes = any(
                f.suffix.lower() in MESH_SUFFIXES or (f.suffix.lower() == ".ply" and _declares_faces(f))
                for s in self._splits
                for f in self._files(s)
            )
        return self._has_meshes

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        for f in self._files(split):
            yield self.read(split, f)

    def tasks(self, split: str) -> list[Any]:
        return [str(f) for f in self._files(split)]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        yield self.read(split, Path(task))

    def read(self, split: str, f: Path) -> Sample | DataError:
        """The sample of one file (or the :class:`DataError` that names what is wrong with it)."""
        label = self.classes.index(f.parent.parent.name if self.class_major else f.parent.name)
        sample_id = f"{self.classes[label]}/{f.stem}"
        try:
            if is_mesh_file(f):
                vertices, faces = read_mesh(f)
                vertices = to_y_up(vertices, self.up_axis)
                points = surface_points((vertices, faces), self.mesh_points, sample_id, self.seed, self.fps)
                return Sample(sample_id, points, None, label, str(f), 0, split, mesh=(vertices, faces))
            points = to_y_up(read_point_file(f), self.up_axis)
        except DataError as err:
            return err
        return Sample(sample_id, points, None, label, str(f), 0, split)


def _declares_faces(f: Path) -> bool:
    try:
        return is_mesh_file(f)
    except DataError:
        return False


def read_point_file(path: Path) -> np.ndarray:
    """``[N, 3]`` float32 from a .ply, .npy (first 3 columns) or .xyz/.txt (whitespace or commas) file."""
    suffix = path.suffix.lower()
    if suffix == ".ply":
        return read_ply(path)
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            text = path.read_text().replace(",", " ")
            arr = np.loadtxt(text.splitlines(), dtype=np.float32, ndmin=2)
    except (OSError, ValueError) as err:
        raise DataError(str(path), f"unreadable point file: {err}") from err
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise DataError(str(path), f"points must be [N, 3] (or more columns), got {tuple(arr.shape)}")
    return np.ascontiguousarray(arr[:, :3], dtype=np.float32)
