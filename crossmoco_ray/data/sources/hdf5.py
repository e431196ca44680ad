"""ModelNet40 / ScanObjectNN sources: HDF5 files with ``data`` [N, P, 3] and ``label`` ([N, 1] or [N]).

A source is a file, a directory of ``*.h5`` or a glob; the split comes from the file name (``train`` /
``test``). Rows are read in chunks of :data:`H5_CHUNK`, so a file never has to fit in memory, and a bad
file or chunk is yielded as a :class:`DataError` naming it while the other files go on.

Every file may be damaged or hostile, so what it claims (its datasets, their shapes and types, the rows
they really store, links out of the file) is checked before anything is read: :mod:`.hdf5_checks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source, UpAxis, decodable, file_identity, regular_file, to_y_up
from crossmoco_ray.data.sources.hdf5_checks import (
    H5_ERRORS,
    NAME_CHARS,
    UNKNOWN_ROWS,
    describe_error,
    format_bytes,
    h5_files,
    inspect_h5,
    member,
    open_h5,
    sample_id,
)
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_STEMS, SCANOBJECTNN_VARIANTS
from crossmoco_ray.errors import DataError

H5_CHUNK = 512  # rows per task of prepare --ray and per read
READ_BYTES = 32 * 1024**2  # at most this much of 'data' per read: rows of huge clouds are read fewer at once
NAMES_FILE_BYTES = 1024**2  # shape_names.txt larger than this is not a list of class names

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
    listing = printable(
        "; ".join(f"{v}: {', '.join(p.name for p in fs)}" for v, fs in sorted(found.items())), 600
    )
    if variant is None:
        if len(found) > 1:
            raise DataError(
                printable(path),
                f"holds several ScanObjectNN variants ({listing}); choose one with --variant "
                f"({' | '.join(v for v in sorted(found) if v != 'other')})",
            )
        return files
    if variant not in found:
        where = "main_split_nobg/" if variant == "obj_only" or variant.endswith("_nobg") else "main_split/"
        raise DataError(
            printable(path), f"no files of ScanObjectNN variant {variant} here ({listing}); it is in {where}"
        )
    return found[variant]


def _scanobjectnn_root(path: Path, variant: str | None) -> Path:
    """``h5_files/`` (holding ``main_split/`` and ``main_split_nobg/``) → the directory of ``variant``."""
    subdirs = [d for d in (path / "main_split", path / "main_split_nobg") if d.is_dir()]
    if variant is None:
        if len(subdirs) > 1:
            raise DataError(
                printable(path),
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
        self.files = select_variant(path, h5_files(p), variant)
        self.by_split: dict[str, list[Path]] = {}
        for f in self.files:
            name = f.name.lower()
            split = "train" if "train" in name else "test" if "test" in name else None
            if split is None:
                raise DataError(
                    printable(f), "cannot tell the split from the file name: put 'train' or 'test' in it"
                )
            self.by_split.setdefault(split, []).append(f)
        self.root = Path(self.files[0]).parent
        self._inferred: list[str] | None = None

    def splits(self) -> list[str]:
        return [s for s in ("train", "test") if s in self.by_split]

    def class_names(self) -> list[str] | None:
        names_file = self.root / "shape_names.txt"
        if regular_file(names_file):
            return _read_names(names_file)
        if self.format == "scanobjectnn":
            return list(SCANOBJECTNN_CLASSES)
        if self._inferred is None:
            self._inferred = [str(c) for c in range(self._distinct_labels())]
        return self._inferred

    def label_hint(self) -> str:
        names_file = self.root / "shape_names.txt"
        if regular_file(names_file) or self.format == "scanobjectnn":
            return ""
        return (
            f"; without {printable(names_file)} the class count is inferred from the distinct labels: "
            "add that file (one class name per line, in label order) if this label is right"
        )

    def _distinct_labels(self) -> int:
        """How many distinct valid labels (non-negative integers) the readable files hold."""
        seen: set[int] = set()
        for f in self.files:
            try:
                with open_h5(f) as h5:
                    layout = inspect_h5(h5, f)
                    for start in range(0, layout.readable, 1 << 16):
                        labels = np.asarray(layout.labels[start : start + (1 << 16)]).reshape(-1)
                        valid = labels[np.isfinite(labels) & (labels >= 0) & (labels == np.round(labels))]
                        seen |= {int(v) for v in np.unique(valid)}
            except H5_ERRORS:
                continue  # named when its samples are read (DataError is a ValueError)
        return len(seen)

    def count(self, split: str) -> int | None:
        """Rows of the readable files of ``split`` (an unreadable file is named when its samples are read)."""
        total = 0
        for f in self.by_split.get(split, []):
            try:
                with open_h5(f) as h5:
                    total += inspect_h5(h5, f).readable
            except H5_ERRORS:
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
        own (unreadable, no labels, shapes that disagree, rows it claims but does not hold) is one task,
        which names it once when read, and so are the rows missing from a file cut short."""
        out: list[Any] = []
        for f in sorted(self.by_split.get(split, [])):
            try:
                with open_h5(f) as h5:
                    layout = inspect_h5(h5, f)
                rows, readable = layout.rows, layout.readable
            except H5_ERRORS:
                rows = readable = 0
            if rows == 0:
                out.append((str(f), 0, None))
                continue
            out += [(str(f), a, min(a + H5_CHUNK, readable)) for a in range(0, readable, H5_CHUNK)]
            if readable < rows:
                out.append((str(f), readable, rows))
        return out

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        f, start, stop = task
        try:
            yield from self._file_samples(Path(f), split, start, stop)
        except DataError as err:
            yield err
        except H5_ERRORS as err:  # h5py on a structure it cannot read: the file, not the program, is bad
            yield DataError(printable(f), f"unreadable HDF5 file: {describe_error(err)}{UNKNOWN_ROWS}")

    def _file_samples(
        self, f: Path, split: str, first: int = 0, end: int | None = None
    ) -> Iterator[Sample | DataError]:
        """Rows ``first..end`` of ``f`` (all by default); a problem of the whole file is raised."""
        where = printable(f)
        with open_h5(f) as h5:
            layout = inspect_h5(h5, f)
            data, labels, names = layout.data, layout.labels, layout.names
            end = layout.rows if end is None else min(end, layout.rows)
            if names is None and not decodable(Path(f.stem)):
                raise DataError(
                    where,
                    "its name is not valid UTF-8 and it has no 'name' dataset, so its rows have no text "
                    f"ids: rename it; all {layout.rows} rows skipped",
                    rows=max(layout.rows, 1),
                )
            held = min(end, layout.readable)
            step = max(1, min(H5_CHUNK, READ_BYTES // max(layout.row_bytes, 1)))
            for start in range(first, held, step):
                stop = min(start + step, held)
                try:
                    with np.errstate(
                        over="ignore"
                    ):  # float64 beyond float32 becomes inf: named by the checks
                        block = np.asarray(data[start:stop, :, :3], dtype=np.float32)
                    lab = np.asarray(labels[start:stop]).reshape(stop - start)
                    ids = None if names is None else np.asarray(names[start:stop]).reshape(stop - start)
                except H5_ERRORS as err:
                    yield DataError(
                        where,
                        f"unreadable rows {start}..{stop - 1} (truncated file?): {describe_error(err)}",
                        start,
                        rows=stop - start,
                    )
                    continue
                block = to_y_up(block, self.up_axis)
                for j in range(len(block)):
                    i = start + j
                    value = lab[j]
                    if not np.isfinite(value) or value != np.round(value):
                        yield DataError(where, f"label {float(value):g} is not an integer class index", i)
                        continue
                    sid = f"{f.stem}-{i:06d}" if ids is None else sample_id(ids[j])
                    if isinstance(sid, DataError):
                        yield DataError(where, sid.problem, i)
                        continue
                    # A copy: a sample kept by the consumer must not pin the whole block in memory.
                    yield Sample(sid, block[j].copy(), None, int(value), where, i, split)
                del block  # before the next block is read: one block in memory, not two
            gone = max(first, layout.readable)
            if gone < end:
                yield DataError(
                    where,
                    f"the file ends before rows {gone}..{end - 1} of the {layout.rows} it declares "
                    "(truncated?); they are skipped",
                    gone,
                    rows=end - gone,
                )


def _read_names(path: Path) -> list[str]:
    """Class names, one per line, of ``shape_names.txt``."""
    try:
        if path.stat().st_size > NAMES_FILE_BYTES:
            raise DataError(
                printable(path), f"over {format_bytes(NAMES_FILE_BYTES)}: not a list of class names"
            )
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(printable(path), f"unreadable: {describe_error(err)}") from None
    except UnicodeDecodeError as err:
        raise DataError(printable(path), f"not UTF-8 text ({err.reason} at byte {err.start})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    bad = next((n for n in names if len(n) > NAME_CHARS or not n.isprintable()), None)
    if bad is not None:
        raise DataError(
            printable(path),
            f"class name {printable(bad, 60)!r} is not usable (printable, ≤ {NAME_CHARS} chars)",
        )
    return names


def h5_format(spec: str | Path) -> str:
    """``"modelnet40"`` (``label`` [N, 1]) or ``"scanobjectnn"`` (``label`` [N]), judged by the first file
    whose labels can be looked at (``"modelnet40"`` when none can: reading names the bad files)."""
    for f in h5_files(spec):
        try:
            with open_h5(f) as h5:
                labels = member(h5, "label", f)
                if isinstance(labels, h5py.Dataset):
                    return "modelnet40" if labels.ndim == 2 else "scanobjectnn"
        except H5_ERRORS:
            continue
    return "modelnet40"
