"""Readers: every supported source yields :class:`Sample` s (id, points [N, 3], views or None, label or None).

- ``modelnet40`` / ``scanobjectnn``: HDF5 files with ``data`` [N, P, 3] and ``label`` ([N, 1] or [N]);
  a file, a directory or a glob; the split comes from the file name (``train`` / ``test``).
- ``shapenetrender``: CrossPoint's layout, ``ShapeNet/<synset>/<id>.ply`` with
  ``ShapeNetRendering/<synset>/<id>/rendering/*.png``.
- ``folder``: ``<root>/[<split>/]<class>/<name>.{ply,npy,xyz,txt}``; the class is the parent folder.
- ``synthetic``: the built-in procedural set.

Every reader streams (HDF5 in chunks of rows, files one by one) and returns points in the project's
canonical frame, **y up**: a z-up source (``up_axis="z"``, e.g. the raw ModelNet frame) is rotated on read,
so pretraining augmentation, rendering and evaluation all agree on the up axis.
"""

from __future__ import annotations

import glob as globlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np

from .ply import read_ply
from .synthetic import GENERATOR_VERSION, synthetic_samples
from .synthetic import class_names as synthetic_class_names
from .types import DataError, Sample

UpAxis = Literal["x", "y", "z"]
POINT_SUFFIXES = (".ply", ".npy", ".xyz", ".txt")
H5_CHUNK = 512

# ScanObjectNN's 15 object classes in label order (the h5 files carry indices only).
SCANOBJECTNN_CLASSES = [
    "bag",
    "bin",
    "box",
    "cabinet",
    "chair",
    "desk",
    "display",
    "door",
    "shelf",
    "table",
    "bed",
    "pillow",
    "sink",
    "sofa",
    "toilet",
]


def to_y_up(points: np.ndarray, up_axis: UpAxis) -> np.ndarray:
    """Rotate ``[..., 3]`` points so that the source's ``up_axis`` becomes +y (right-handed)."""
    if up_axis == "y":
        return points
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    if up_axis == "z":  # rotate −90° about x: z → y, y → −z
        return np.stack([x, z, -y], axis=-1)
    return np.stack([-y, x, z], axis=-1)  # x up: rotate +90° about z: x → y, y → −x


class Source(ABC):
    """A dataset on disk (or generated) that can be streamed split by split."""

    format: str = ""

    @abstractmethod
    def splits(self) -> list[str]:
        """The splits this source holds, e.g. ``["train", "test"]``."""

    @abstractmethod
    def samples(self, split: str) -> Iterator[Sample | DataError]:
        """Stream the samples of ``split``.

        Bad input is *yielded* as a :class:`DataError` naming the file (and index) instead of raised, so a
        caller that skips bad samples can go on with the next file; callers that cannot skip raise it.
        """

    def class_names(self) -> list[str] | None:
        """Class names in label order, or ``None`` for unlabelled sources."""
        return None

    def count(self, split: str) -> int | None:
        """Number of samples in ``split`` when known without reading it all (for progress)."""
        return None

    def has_views(self) -> bool:
        """Whether samples carry their own images (otherwise they are rendered at prepare time)."""
        return False

    def identity(self) -> dict[str, Any]:
        """What identifies this source's content (files, sizes, times) for re-run detection."""
        return {"format": self.format}

    def label_hint(self) -> str:
        """Where the class count comes from, when it is a guess (appended to label errors)."""
        return ""


def _file_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, int(st.st_mtime)))
    return out


class H5Source(Source):
    """ModelNet40-style (``label`` [N, 1]) or ScanObjectNN-style (``label`` [N]) HDF5 files.

    Labels are class indices: non-negative integers (``-1`` means "unlabelled" in the shards, so it is not
    a class). Class names come from ``shape_names.txt`` beside the files (ScanObjectNN: its 15 known names);
    without it the class count is inferred from the distinct valid labels of all files, so that a stray
    label (99 among 0..39) is named as bad instead of silently creating 60 empty classes.
    """

    def __init__(self, path: str | Path, format: str = "modelnet40", up_axis: UpAxis = "y") -> None:
        self.format, self.up_axis = format, up_axis
        self.files = _h5_files(path)
        self.by_split: dict[str, list[Path]] = {}
        for f in self.files:
            name = f.name.lower()
            split = "train" if "train" in name else "test" if "test" in name else None
            if split is None:
                raise DataError(
                    str(f), "cannot tell the split from the file name: put 'train' or 'test' in it"
                )
            self.by_split.setdefault(split, []).append(f)
        self.root = Path(self.files[0]).parent
        self._inferred: list[str] | None = None

    def splits(self) -> list[str]:
        return [s for s in ("train", "test") if s in self.by_split]

    def class_names(self) -> list[str] | None:
        names_file = self.root / "shape_names.txt"
        if names_file.is_file():
            return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if self.format == "scanobjectnn":
            return list(SCANOBJECTNN_CLASSES)
        if self._inferred is None:
            self._inferred = [str(c) for c in range(self._distinct_labels())]
        return self._inferred

    def label_hint(self) -> str:
        names_file = self.root / "shape_names.txt"
        if names_file.is_file() or self.format == "scanobjectnn":
            return ""
        return (
            f"; without {names_file} the class count is inferred from the distinct labels: add that file "
            "(one class name per line, in label order) if this label is right"
        )

    def _distinct_labels(self) -> int:
        """How many distinct valid labels (non-negative integers) the readable files hold."""
        seen: set[int] = set()
        for f in self.files:
            try:
                with _open_h5(f) as h5:
                    labels = np.asarray(_dataset(h5, "label", f)[()]).reshape(-1)
            except (DataError, OSError):
                continue  # named when its samples are read
            valid = labels[(labels >= 0) & (labels == np.round(labels))]
            seen |= {int(v) for v in np.unique(valid)}
        return len(seen)

    def count(self, split: str) -> int | None:
        """Rows of the readable files of ``split`` (an unreadable file is named when its samples are read)."""
        total = 0
        for f in self.by_split.get(split, []):
            try:
                with _open_h5(f) as h5:
                    total += int(_dataset(h5, "data", f).shape[0])
            except (DataError, OSError):
                continue
        return total

    def identity(self) -> dict[str, Any]:
        return {"format": self.format, "up_axis": self.up_axis, "files": _file_identity(self.files)}

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        for f in sorted(self.by_split.get(split, [])):
            try:
                yield from self._file_samples(f, split)
            except DataError as err:
                yield err

    def _file_samples(self, f: Path, split: str) -> Iterator[Sample | DataError]:
        with _open_h5(f) as h5:
            data = _dataset(h5, "data", f)
            rows = int(data.shape[0]) if data.ndim else 0
            if "label" not in h5:
                raise DataError(
                    str(f),
                    f"no 'label' dataset (found: {sorted(h5.keys())}); all {rows} rows skipped",
                    rows=rows,
                )
            labels = h5["label"]
            names = h5.get("name")
            if data.ndim != 3 or data.shape[-1] < 3:
                raise DataError(
                    str(f), f"'data' must be [N, P, 3], got {tuple(data.shape)}", rows=max(rows, 1)
                )
            if labels.shape[0] != data.shape[0]:
                raise DataError(
                    str(f),
                    f"'label' has {labels.shape[0]} rows but 'data' has {data.shape[0]}; "
                    f"all {rows} rows skipped",
                    rows=rows,
                )
            for start in range(0, data.shape[0], H5_CHUNK):
                stop = min(start + H5_CHUNK, data.shape[0])
                try:
                    block = np.asarray(data[start:stop, :, :3], dtype=np.float32)
                    lab = np.asarray(labels[start:stop]).reshape(len(block), -1)[:, 0]
                    ids = None if names is None else names[start:stop]
                except OSError as err:
                    yield DataError(
                        str(f),
                        f"unreadable rows {start}..{stop - 1} (truncated file?): {err}",
                        start,
                        rows=stop - start,
                    )
                    continue
                block = to_y_up(block, self.up_axis)
                for j in range(len(block)):
                    i = start + j
                    value = lab[j]
                    if not np.isfinite(value) or value != np.round(value):
                        yield DataError(str(f), f"label {float(value):g} is not an integer class index", i)
                        continue
                    sid = _decode_name(ids[j]) if ids is not None else f"{f.stem}-{i:06d}"
                    yield Sample(sid, block[j], None, int(value), str(f), i, split)


def _h5_files(path: str | Path) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.h5"))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in globlib.glob(str(path)))
    if not files:
        raise DataError(str(path), "no .h5 files found")
    return files


def _open_h5(f: Path) -> h5py.File:
    try:
        return h5py.File(f, "r")
    except OSError as err:
        raise DataError(str(f), f"cannot open HDF5 file (truncated or corrupt?): {err}") from err


def _dataset(h5: h5py.File, key: str, f: Path) -> h5py.Dataset:
    if key not in h5:
        raise DataError(str(f), f"no '{key}' dataset (found: {sorted(h5.keys())})")
    return h5[key]


def _decode_name(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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
        return {"format": self.format, "up_axis": self.up_axis, "files": _file_identity(self.clouds)}

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
        return {"format": self.format, "up_axis": self.up_axis, "files": _file_identity(files)}

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


class SyntheticSource(Source):
    """The built-in procedural shapes (labelled; views rendered at prepare time)."""

    format = "synthetic"

    def __init__(self, counts: dict[str, int], num_points: int, seed: int = 0) -> None:
        self.counts, self.num_points, self.seed = dict(counts), num_points, seed

    def splits(self) -> list[str]:
        return list(self.counts)

    def class_names(self) -> list[str] | None:
        return synthetic_class_names()

    def count(self, split: str) -> int | None:
        return self.counts[split]

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


FORMATS = ("modelnet40", "scanobjectnn", "shapenetrender", "folder", "synthetic")


def open_source(
    spec: str,
    format: str = "auto",
    up_axis: UpAxis = "y",
    synthetic_counts: dict[str, int] | None = None,
    num_points: int = 2048,
    seed: int = 0,
) -> Source:
    """A :class:`Source` for ``spec`` (a path, a glob or ``"synthetic"``), detecting the format if asked."""
    if format == "auto":
        format = detect_format(spec)
    if format == "synthetic":
        return SyntheticSource(synthetic_counts or {"train": 2000, "test": 500}, num_points, seed)
    if format in ("modelnet40", "scanobjectnn"):
        return H5Source(spec, format, up_axis)
    if format == "shapenetrender":
        return ShapeNetRenderSource(spec, up_axis)
    if format == "folder":
        return FolderSource(spec, up_axis)
    raise ValueError(f"unknown source format {format!r}; choose one of {FORMATS} or 'auto'")


def detect_format(spec: str) -> str:
    """Guess a source's format from what is on disk."""
    if spec == "synthetic":
        return "synthetic"
    p = Path(spec)
    if p.is_dir() and (p / "ShapeNet").is_dir() and (p / "ShapeNetRendering").is_dir():
        return "shapenetrender"
    is_h5 = p.suffix == ".h5" or (p.is_dir() and any(p.glob("*.h5")))
    if is_h5 or (not p.exists() and any(f.endswith(".h5") for f in globlib.glob(spec))):
        first = _h5_files(spec)[0]
        with _open_h5(first) as h5:
            return "modelnet40" if _dataset(h5, "label", first).ndim == 2 else "scanobjectnn"
    if p.is_dir():
        return "folder"
    raise DataError(spec, "not found: give a directory, an .h5 file or glob, or 'synthetic'")
