"""Readers: every supported source yields :class:`Sample` s (id, points [N, 3], views or None, label or None).

- ``modelnet40`` / ``scanobjectnn``: HDF5 files (:mod:`.hdf5`), a file, a directory or a glob; the split
  comes from the file name (``train`` / ``test``).
- ``shapenetrender``: CrossPoint's layout, ``ShapeNet/<synset>/<id>.ply`` with
  ``ShapeNetRendering/<synset>/<id>/rendering/*.png`` (:mod:`.folders`).
- ``folder``: ``<root>/[<split>/]<class>/<name>.<ext>`` or ModelNet's ``<root>/<class>/<split>/``; points
  (``.ply .npy .xyz .txt``) or meshes (``.off .obj .stl .glb .gltf``, ``.ply`` with faces)
  (:mod:`.folders`, :mod:`.mesh`).
- ``corpus``: every point or mesh file below a folder, unlabelled (e.g. Objaverse's ``glbs/``;
  :mod:`.corpus`); chosen explicitly, never detected.
- ``list``: a text file naming object files, local paths or URIs, one a line, optionally with a class
  column (:mod:`.filelist`); detected for a ``.txt``/``.lst`` file or URI.
- ``synthetic``: the built-in procedural set.

This module is the front door: :func:`open_source` picks the reader (detecting the format if asked) and the
source classes are importable from here. Every reader streams (HDF5 in chunks of rows, files one by one)
and returns points in the project's canonical frame, **y up** (:func:`.source.to_y_up`).
"""

from __future__ import annotations

import glob as globlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source, UpAxis, to_y_up
from crossmoco_ray.data.sources.corpus import CorpusSource
from crossmoco_ray.data.sources.filelist import ListSource
from crossmoco_ray.data.sources.folders import FolderSource, ShapeNetRenderSource, read_point_file
from crossmoco_ray.data.sources.hdf5 import H5Source, h5_format
from crossmoco_ray.data.sources.objects import Sampling
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.data.synthetic.dataset import GENERATOR_VERSION, synthetic_range, synthetic_samples
from crossmoco_ray.data.synthetic.dataset import class_names as synthetic_class_names
from crossmoco_ray.errors import DataError

__all__ = [
    "FORMATS",
    "CorpusSource",
    "FolderSource",
    "H5Source",
    "ListSource",
    "ShapeNetRenderSource",
    "Source",
    "SyntheticSource",
    "UpAxis",
    "detect_format",
    "open_source",
    "read_point_file",
    "to_y_up",
]


SYNTHETIC_TASK = 16  # built-in objects per task of prepare --ray


class SyntheticSource(Source):
    """The built-in procedural objects (labelled; meshes, whose shaded views are rendered at prepare time)."""

    format = "synthetic"

    def __init__(self, counts: dict[str, int], num_points: int, seed: int = 0) -> None:
        self.counts, self.num_points, self.seed = dict(counts), num_points, seed

    def splits(self) -> list[str]:
        return list(self.counts)

    def class_names(self) -> list[str] | None:
        return synthetic_class_names()

    def count(self, split: str) -> int | None:
        return self.counts[split]

    def has_meshes(self) -> bool:
        return True

    def identity(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "generator": GENERATOR_VERSION,
            "counts": self.counts,
            "num_points": self.num_points,
            "seed": self.seed,
        }

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        return synthetic_samples(self.counts[split], self.num_points, seed=self.seed, split=split)

    def tasks(self, split: str) -> list[Any]:
        n = self.counts[split]
        return [(a, min(a + SYNTHETIC_TASK, n)) for a in range(0, n, SYNTHETIC_TASK)]

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        first, end = task
        return synthetic_range(first, end, self.num_points, seed=self.seed, split=split)


FORMATS = ("modelnet40", "scanobjectnn", "shapenetrender", "folder", "corpus", "list", "synthetic")
LIST_SUFFIXES = (".txt", ".lst", ".list")


def open_source(
    spec: str,
    format: str = "auto",
    up_axis: UpAxis = "y",
    synthetic_counts: dict[str, int] | None = None,
    num_points: int = 2048,
    seed: int = 0,
    variant: str | None = None,
    fps: bool = False,
) -> Source:
    """A :class:`Source` for ``spec`` (a path, a glob or ``"synthetic"``), detecting the format if asked.

    ``variant``: which ScanObjectNN variant (``obj_bg``, ``obj_only``, ``pb_t50_rs``, ...) to read from a
    directory of its official files; a directory that holds several without one is an error listing them.
    ``num_points``: how many points the synthetic generator and mesh files give each object (``fps``:
    farthest-point sampled on meshes).
    """
    if format == "auto":
        format = detect_format(spec)
    if variant is not None and format not in ("modelnet40", "scanobjectnn"):
        raise ValueError(
            f"--variant picks a ScanObjectNN variant among h5 files; {printable(spec)} is a {format} source"
        )
    if format == "synthetic":
        return SyntheticSource(synthetic_counts or {"train": 2000, "test": 500}, num_points, seed)
    if format in ("modelnet40", "scanobjectnn"):
        return H5Source(spec, format, up_axis, variant)
    if format == "shapenetrender":
        return ShapeNetRenderSource(spec, up_axis)
    if format == "folder":
        return FolderSource(spec, up_axis, mesh_points=num_points, seed=seed, fps=fps)
    if format in ("corpus", "list"):
        sampling = Sampling(up_axis, num_points, seed, fps)
        return CorpusSource(spec, sampling) if format == "corpus" else ListSource(spec, sampling)
    raise ValueError(f"unknown source format {format!r}; choose one of {FORMATS} or 'auto'")


def detect_format(spec: str) -> str:
    """Guess a source's format from what is on disk."""
    if spec == "synthetic":
        return "synthetic"
    if "://" in spec and not spec.startswith("file://"):
        if spec.lower().endswith(LIST_SUFFIXES):
            return "list"
        raise DataError(printable(spec), "a URI source is a list of files (.txt, one path or URI a line)")
    p = Path(spec.removeprefix("file://"))
    if p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
        return "list"
    if p.is_dir() and (p / "ShapeNet").is_dir() and (p / "ShapeNetRendering").is_dir():
        return "shapenetrender"
    if (
        p.is_dir()
        and not any(p.glob("*.h5"))
        and any((p / d).is_dir() for d in ("main_split", "main_split_nobg"))
    ):
        return "scanobjectnn"  # ScanObjectNN's h5_files/: the variant picks the directory
    is_h5 = p.suffix == ".h5" or (p.is_dir() and any(p.glob("*.h5")))
    if is_h5 or (not p.exists() and any(f.endswith(".h5") for f in globlib.glob(spec))):
        return h5_format(spec)
    if p.is_dir():
        return "folder"
    raise DataError(
        printable(spec),
        "not found: give a directory, an .h5 file or glob, a list of files (.txt), or 'synthetic'",
    )
