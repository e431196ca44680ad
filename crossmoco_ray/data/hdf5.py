"""ModelNet40 / ScanObjectNN sources: HDF5 files with ``data`` [N, P, 3] and ``label`` ([N, 1] or [N]).

A source is a file, a directory of ``*.h5`` or a glob; the split comes from the file name (``train`` /
``test``). Rows are read in chunks of :data:`H5_CHUNK`, so a file never has to fit in memory, and a bad
file or chunk is yielded as a :class:`DataError` naming it while the other files go on.
"""

from __future__ import annotations

import glob as globlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .source import Source, UpAxis, file_identity, to_y_up
from .types import DataError, Sample
from .variants import SCANOBJECTNN_STEMS, SCANOBJECTNN_VARIANTS

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


_OFFICIAL_NAME = re.compile(r"(?:training|test)_(objectdataset\w*)\.h5")


def scanobjectnn_variant(f: Path) -> str | None:
    """The ScanObjectNN variant of an official file name (``None`` for other names, e.g. ``train.h5``)."""
    m = _OFFICIAL_NAME.fullmatch(f.name)
    if m is None:
        return None
    base = SCANOBJECTNN_STEMS.get(m.group(1), m.group(1))
    if not f.parent.name.endswith("_nobg"):
        return base
    return "obj_only" if base == "obj_bg" else f"{base}_nobg"


def select_variant(path: str | Path, files: list[Path], variant: str | None) -> list[Path]:
    """The files of one ScanObjectNN variant: all of them when they hold one; an error listing the
    variants when they mix several and none is chosen, or when the chosen one is not among them."""
    if variant is not None and variant not in SCANOBJECTNN_VARIANTS:
        raise ValueError(
            f"unknown ScanObjectNN variant {variant!r}; choose one of {', '.join(SCANOBJECTNN_VARIANTS)}"
        )
    found: dict[str, list[Path]] = {}
    for f in files:
        found.setdefault(scanobjectnn_variant(f) or "other", []).append(f)
    listing = "; ".join(f"{v}: {', '.join(p.name for p in fs)}" for v, fs in sorted(found.items()))
    if variant is None:
        if len(found) > 1:
            raise DataError(
                str(path),
                f"holds several ScanObjectNN variants ({listing}); choose one with --variant "
                f"({' | '.join(v for v in sorted(found) if v != 'other')})",
            )
        return files
    if variant not in found:
        where = "main_split_nobg/" if variant == "obj_only" or variant.endswith("_nobg") else "main_split/"
        raise DataError(
            str(path), f"no files of ScanObjectNN variant {variant} here ({listing}); it is in {where}"
        )
    return found[variant]


def _scanobjectnn_root(path: Path, variant: str | None) -> Path:
    """``h5_files/`` (holding ``main_split/`` and ``main_split_nobg/``) → the directory of ``variant``."""
    subdirs = [d for d in (path / "main_split", path / "main_split_nobg") if d.is_dir()]
    if variant is None:
        if len(subdirs) > 1:
            raise DataError(
                str(path),
                "holds main_split/ (objects with background) and main_split_nobg/ (objects alone); choose "
                f"a variant with --variant ({' | '.join(SCANOBJECTNN_VARIANTS)}) or point at one of them",
            )
        return subdirs[0]
    nobg = variant == "obj_only" or variant.endswith("_nobg")
    return path / ("main_split_nobg" if nobg else "main_split")


class H5Source(Source):
    """ModelNet40-style (``label`` [N, 1]) or ScanObjectNN-style (``label`` [N]) HDF5 files.

    Labels are class indices: non-negative integers (``-1`` means "unlabelled" in the shards, so it is not
    a class). Class names come from ``shape_names.txt`` beside the files (ScanObjectNN: its 15 known names);
    without it the class count is inferred from the distinct valid labels of all files, so that a stray
    label (99 among 0..39) is named as bad instead of silently creating 60 empty classes.
    """

    def __init__(
        self, path: str | Path, format: str = "modelnet40", up_axis: UpAxis = "y", variant: str | None = None
    ) -> None:
        self.format, self.up_axis, self.variant = format, up_axis, variant
        p = Path(path)
        if (
            p.is_dir()
            and not any(p.glob("*.h5"))
            and any((p / d).is_dir() for d in ("main_split", "main_split_nobg"))
        ):
            p = _scanobjectnn_root(p, variant)
        self.files = select_variant(path, _h5_files(p), variant)
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
        out = {"format": self.format, "up_axis": self.up_axis, "files": file_identity(self.files)}
        if self.variant is not None:
            out["variant"] = self.variant
        return out

    def samples(self, split: str) -> Iterator[Sample | DataError]:
        for f in sorted(self.by_split.get(split, [])):
            yield from self.read_task(split, (str(f), 0, None))

    def tasks(self, split: str) -> list[Any]:
        """``(file, first row, end row)`` per chunk of :data:`H5_CHUNK` rows; a file with a problem of its
        own (unreadable, no labels, shapes that disagree) is one task, which names it once when read."""
        out: list[Any] = []
        for f in sorted(self.by_split.get(split, [])):
            try:
                with _open_h5(f) as h5:
                    rows = int(_checked_datasets(h5, f)[0].shape[0])
            except (DataError, OSError):
                rows = 0
            if rows == 0:
                out.append((str(f), 0, None))
            else:
                out += [(str(f), a, min(a + H5_CHUNK, rows)) for a in range(0, rows, H5_CHUNK)]
        return out

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        f, start, stop = task
        try:
            yield from self._file_samples(Path(f), split, start, stop)
        except DataError as err:
            yield err

    def _file_samples(
        self, f: Path, split: str, first: int = 0, end: int | None = None
    ) -> Iterator[Sample | DataError]:
        """Rows ``first..end`` of ``f`` (all by default); a problem of the whole file is raised."""
        with _open_h5(f) as h5:
            data, labels = _checked_datasets(h5, f)
            names = h5.get("name")
            end = data.shape[0] if end is None else end
            for start in range(first, end, H5_CHUNK):
                stop = min(start + H5_CHUNK, end)
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


def _checked_datasets(h5: h5py.File, f: Path) -> tuple[h5py.Dataset, h5py.Dataset]:
    """``data`` and ``label`` of an open file, or the :class:`DataError` that costs the whole file."""
    data = _dataset(h5, "data", f)
    rows = int(data.shape[0]) if data.ndim else 0
    if "label" not in h5:
        raise DataError(
            str(f), f"no 'label' dataset (found: {sorted(h5.keys())}); all {rows} rows skipped", rows=rows
        )
    labels = h5["label"]
    if data.ndim != 3 or data.shape[-1] < 3:
        raise DataError(str(f), f"'data' must be [N, P, 3], got {tuple(data.shape)}", rows=max(rows, 1))
    if labels.shape[0] != data.shape[0]:
        raise DataError(
            str(f),
            f"'label' has {labels.shape[0]} rows but 'data' has {data.shape[0]}; all {rows} rows skipped",
            rows=rows,
        )
    return data, labels


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


def h5_format(spec: str | Path) -> str:
    """``"modelnet40"`` (``label`` [N, 1]) or ``"scanobjectnn"`` (``label`` [N]), judged by the first file."""
    first = _h5_files(spec)[0]
    with _open_h5(first) as h5:
        return "modelnet40" if _dataset(h5, "label", first).ndim == 2 else "scanobjectnn"
