"""File-per-object sources: CrossPoint's ShapeNetRender layout and plain class folders.

- ``shapenetrender``: ``ShapeNet/<synset>/<id>.ply`` with ``ShapeNetRendering/<synset>/<id>/rendering/*.png``
  (the views come with the data; nothing is rendered at prepare time).
- ``folder``: ``<root>/[<split>/]<class>/<name>.{ply,npy,xyz,txt}``; the class is the parent folder.

Files are read one at a time; an unreadable one is yielded as a :class:`DataError` naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .ply import read_ply
from .source import Source, UpAxis, file_identity, to_y_up
from .types import DataError, Sample

POINT_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")


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
        label_of = {s: i for i, s in enumerate(self.synsets)}
        for ply in self.clouds:
            try:
                yield self._sample(ply, label_of[ply.parent.name], split)
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
    """``<root>/[<split>/]<class>/<name>.{ply,npy,xyz,txt}``: one cloud per file, class = parent folder."""

    format = "folder"

    def __init__(self, root: str | Path, up_axis: UpAxis = "y") -> None:
        self.root, self.up_axis = Path(root), up_axis
        split_dirs = [d for d in ("train", "test", "val") if (self.root / d).is_dir()]
        self.split_roots = {s: self.root / s for s in split_dirs} or {"train": self.root}
        self.classes = sorted(
            {c.name for base in self.split_roots.values() for c in base.iterdir() if c.is_dir()}
        )
        if not self.classes:
            raise DataError(str(self.root), "no class folders with point files found")

    def _files(self, split: str) -> list[Path]:
        base = self.split_roots[split]
        return sorted(
            f for c in self.classes for f in (base / c).glob("*") if f.suffix.lower() in POINT_SUFFIXES
        )

    def splits(self) -> list[str]:
        return list(self.split_roots)

    def class_names(self) -> list[str] | None:
        return self.classes

    def count(self, split: str) -> int | None:
        return len(self._files(split))

    def identity(self) -> dict[str, Any]:
        files = [f for s in self.split_roots for f in self._files(s)]
        return {"format": self.format, "up_axis": self.up_axis, "files": file_identity(files)}

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        label_of = {c: i for i, c in enumerate(self.classes)}
        for f in self._files(split):
            try:
                points = to_y_up(read_point_file(f), self.up_axis)
            except DataError as err:
                yield err
                continue
            yield Sample(f"{f.parent.name}/{f.stem}", points, None, label_of[f.parent.name], str(f), 0, split)


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
