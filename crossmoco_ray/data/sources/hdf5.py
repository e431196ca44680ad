"""ModelNet40 / ScanObjectNN sources: HDF5 files with ``data`` [N, P, 3] and ``label`` ([N, 1] or [N]).

A source is a file, a directory of ``*.h5`` or a glob; the split comes from the file name (``train`` /
``test``). Rows are read in chunks of :data:`H5_CHUNK`, so a file never has to fit in memory, and a bad
file or chunk is yielded as a :class:`DataError` naming it while the other files go on.

Every file may be damaged or hostile, so what it claims is checked before anything is read (:func:`_inspect`):

- The datasets must hold the rows they claim. A 2 KB file can declare 10⁸ rows whose chunks were never
  written; HDF5 reads those as fill values (zeros), so each row would fail later as its own error, costing
  time and memory for nothing. Such a file is one error whose ``rows`` is what it claims; a file cut short
  gives its stored rows and one error for the rest. Chunks are decompressed whole, so they are bounded too.
- Nothing outside the file is read: external links, external raw storage and virtual datasets (which all
  name other files) are refused; soft links are followed inside the file only.
- ``data`` is ``[N, P, ≥3]`` numbers; ``label`` is ``[N]`` or ``[N, 1]`` numbers (a wider label, a group, a
  scalar or strings are named, not guessed at); an optional ``name`` holds ``N`` UTF-8 strings (the ids).
- A file that does not open at all is one error counted as 1 skipped row (what it held is unknown, and the
  message says so); other file-wide errors count every row the file claims.
"""

from __future__ import annotations

import glob as globlib
import itertools
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source, UpAxis, decodable, file_identity, regular_file, to_y_up
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.data.sources.variants import SCANOBJECTNN_STEMS, SCANOBJECTNN_VARIANTS
from crossmoco_ray.errors import DataError

H5_CHUNK = 512  # rows per task of prepare --ray and per read
READ_BYTES = 32 * 1024**2  # at most this much of 'data' per read: rows of huge clouds are read fewer at once
MAX_CHUNK_BYTES = 64 * 1024**2  # HDF5 decompresses a chunk whole; writers use ≤ 1 MiB, so larger is refused
# A compressed dataset may claim at most this many times the bytes it stores: gzip (HDF5's compressor)
# shrinks even all-zero data only about 1030-fold. Claims under SMALL_CLAIM are read whatever they store:
# their memory is bounded anyway, and sorted labels compress very well.
MAX_RATIO = 1100
SMALL_CLAIM = 16 * 1024**2
LINK_DEPTH = 8  # soft links followed in a row, at most
NAME_CHARS = 200  # longest sample id taken from a 'name' dataset
NAMES_FILE_BYTES = 1024**2  # shape_names.txt larger than this is not a list of class names
H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)  # what h5py raises on damaged files

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
        self.files = select_variant(path, _h5_files(p), variant)
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
                with _open_h5(f) as h5:
                    layout = _inspect(h5, f)
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
                with _open_h5(f) as h5:
                    total += _inspect(h5, f).readable
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
                with _open_h5(f) as h5:
                    layout = _inspect(h5, f)
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
            yield DataError(printable(f), f"unreadable HDF5 file: {_why(err)}{_UNKNOWN_ROWS}")

    def _file_samples(
        self, f: Path, split: str, first: int = 0, end: int | None = None
    ) -> Iterator[Sample | DataError]:
        """Rows ``first..end`` of ``f`` (all by default); a problem of the whole file is raised."""
        where = printable(f)
        with _open_h5(f) as h5:
            layout = _inspect(h5, f)
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
                        f"unreadable rows {start}..{stop - 1} (truncated file?): {_why(err)}",
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
                    sid = f"{f.stem}-{i:06d}" if ids is None else _sample_id(ids[j])
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


_UNKNOWN_ROWS = "; how many rows it held is unknown, so it counts as 1 skipped row"


@dataclass
class _Layout:
    """What an HDF5 file holds, checked: its datasets, the rows it claims and the rows it really stores."""

    data: h5py.Dataset
    labels: h5py.Dataset
    names: h5py.Dataset | None
    rows: int  # rows 'data' declares
    readable: int  # leading rows stored in full in every dataset (fewer than ``rows`` in a file cut short)
    row_bytes: int  # bytes of one row of 'data'


def _inspect(h5: h5py.File, f: Path) -> _Layout:
    """``data``, ``label`` and ``name`` of an open file, checked; or the :class:`DataError` that costs the
    whole file (``rows`` = the rows it declares, or 1 when even that is unknown)."""
    where = printable(f)
    data = _member(h5, "data", f)
    if data is None:
        raise DataError(where, f"no 'data' dataset (found: {_keys(h5)}){_UNKNOWN_ROWS}")
    if not isinstance(data, h5py.Dataset):
        raise DataError(where, f"'data' is {_kind(data)}, not a dataset{_UNKNOWN_ROWS}")
    rows = int(data.shape[0]) if data.ndim else 0
    lost = max(rows, 1)
    if data.ndim != 3 or data.shape[1] < 1 or data.shape[2] < 3:
        raise DataError(where, f"'data' must be [N, P, 3], got {_shape(data)}", rows=lost)
    _numeric(data, "data", where, lost)
    labels = _member(h5, "label", f)
    if labels is None:
        raise DataError(where, f"no 'label' dataset (found: {_keys(h5)}); all {rows} rows skipped", rows=lost)
    if not isinstance(labels, h5py.Dataset):
        raise DataError(
            where, f"'label' is {_kind(labels)}, not a dataset; all {rows} rows skipped", rows=lost
        )
    if not (labels.ndim == 1 or (labels.ndim == 2 and labels.shape[1] == 1)):
        raise DataError(
            where,
            f"'label' must be [N] or [N, 1] (one class index per row), got {_shape(labels)}; "
            f"all {rows} rows skipped",
            rows=lost,
        )
    _numeric(labels, "label", where, lost)
    if labels.shape[0] != rows:
        raise DataError(
            where,
            f"'label' has {labels.shape[0]} rows but 'data' has {rows}; all {rows} rows skipped",
            rows=lost,
        )
    names = _member(h5, "name", f)
    if names is not None:
        string = isinstance(names, h5py.Dataset) and (
            names.dtype.kind == "S" or h5py.check_string_dtype(names.dtype) is not None
        )
        if not string or names.shape not in ((rows,), (rows, 1)):
            what = _shape(names) if isinstance(names, h5py.Dataset) else _kind(names)
            raise DataError(
                where,
                f"'name' must hold {rows} strings (the ids), got {what}; all {rows} rows skipped",
                rows=lost,
            )
    size = os.stat(f).st_size
    readable = min(_stored_rows(d, key, where, size, lost) for key, d in _datasets(data, labels, names))
    if rows and readable == 0:
        raise DataError(where, f"the file holds none of the {rows} rows it declares (truncated?)", rows=lost)
    row_bytes = math.prod(data.shape[1:]) * data.dtype.itemsize
    return _Layout(data, labels, names, rows, readable, row_bytes)


def _datasets(
    data: h5py.Dataset, labels: h5py.Dataset, names: h5py.Dataset | None
) -> list[tuple[str, h5py.Dataset]]:
    return [("data", data), ("label", labels)] + ([] if names is None else [("name", names)])


def _stored_rows(dset: h5py.Dataset, key: str, where: str, file_size: int, lost: int) -> int:
    """How many leading rows of ``dset`` the file really stores, or the :class:`DataError` when its storage
    lies about its size or lives in other files."""
    plist = dset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == h5py.h5d.VIRTUAL:
        raise DataError(
            where,
            f"'{key}' is a virtual dataset (its rows live in other files, which are not read)",
            rows=lost,
        )
    if plist.get_external_count():
        raise DataError(where, f"'{key}' keeps its rows in external files, which are not read", rows=lost)
    rows = int(dset.shape[0])
    row_bytes = math.prod(dset.shape[1:]) * dset.dtype.itemsize
    claimed = rows * row_bytes
    if claimed == 0:
        return rows
    stored = int(dset.id.get_storage_size())
    claim = f"'{key}' declares {rows} rows ({_size(claimed)})"
    if layout == h5py.h5d.CHUNKED:
        chunk_bytes = math.prod(dset.chunks) * dset.dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise DataError(
                where,
                f"'{key}' is stored in chunks of {_size(chunk_bytes)}, over the {_size(MAX_CHUNK_BYTES)} "
                "that are decompressed at once",
                rows=lost,
            )
        expected = math.prod(math.ceil(n / c) for n, c in zip(dset.shape, dset.chunks, strict=True))
        written = int(dset.id.get_num_chunks())
        if written < expected:
            raise DataError(
                where,
                f"{claim} but stores only {written} of its {expected} chunks (the others would read as "
                "fill values, not data)",
                rows=lost,
            )
        if claimed > SMALL_CLAIM and claimed > MAX_RATIO * stored:
            raise DataError(
                where,
                f"{claim} but stores only {_size(stored)}, more than {MAX_RATIO}-fold less than any "
                "compression gives",
                rows=lost,
            )
        return rows  # a chunk cut off by truncation is named when its rows are read
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        if stored < claimed or offset is None:
            raise DataError(where, f"{claim} but stores only {_size(stored)} of them", rows=lost)
        return min(rows, max(0, file_size - offset) // row_bytes)
    return rows  # compact: inside the object header, which HDF5 has read already


def _member(h5: h5py.File, path: str, f: Path, depth: int = 0) -> Any:
    """The object at ``path`` (absolute, from the root) or ``None``, following soft links inside the file
    only: a link to another file (external link, or an unknown kind) is a :class:`DataError`, never opened."""
    obj: Any = h5
    for part in [p for p in path.split("/") if p not in ("", ".")]:
        if not isinstance(obj, h5py.Group):
            return None
        link = obj.get(part, getlink=True)
        if link is None:
            return None
        if isinstance(link, h5py.HardLink):
            obj = obj[part]
        elif isinstance(link, h5py.SoftLink):
            if depth >= LINK_DEPTH:
                raise DataError(
                    printable(f), f"soft links to {printable(path)!r} nest more than {LINK_DEPTH} deep"
                )
            target = link.path if link.path.startswith("/") else f"{obj.name.rstrip('/')}/{link.path}"
            obj = _member(h5, target, f, depth + 1)
            if obj is None:
                return None
        else:
            where = getattr(link, "filename", None)
            to = f" to {printable(where)}" if where is not None else ""
            raise DataError(
                printable(f),
                f"{printable(path)!r} is a link{to} outside the file; links to other files are not followed"
                + _UNKNOWN_ROWS,
            )
    return obj


def _numeric(dset: h5py.Dataset, key: str, where: str, lost: int) -> None:
    try:
        kind = dset.dtype.kind if dset.dtype.fields is None else "V"
    except H5_ERRORS as err:  # a type numpy has no equivalent for
        raise DataError(
            where, f"'{key}' has an unreadable type: {_why(err)}; all {lost} rows skipped", rows=lost
        ) from None
    if kind not in "iuf":
        raise DataError(
            where,
            f"'{key}' must hold numbers, got dtype {printable(dset.dtype)}; all {lost} rows skipped",
            rows=lost,
        )


def _sample_id(value: Any) -> str | DataError:
    """A sample id from one entry of a 'name' dataset (a :class:`DataError` that lacks the file when it
    cannot serve: the caller names it)."""
    if isinstance(value, bytes):
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            return DataError("", f"name {printable(value)} is not UTF-8 text")
    else:
        text = str(value)
    if not text.strip():
        return DataError("", "empty name")
    if len(text) > NAME_CHARS or not text.isprintable():
        return DataError(
            "", f"name {printable(text, 60)!r} is not a usable id (printable, ≤ {NAME_CHARS} chars)"
        )
    return text


def _shape(dset: h5py.Dataset) -> str:
    return str(tuple(int(n) for n in dset.shape)) if dset.shape is not None else "a null dataspace"


def _kind(obj: Any) -> str:
    return "a group" if isinstance(obj, h5py.Group) else f"a {type(obj).__name__}"


def _keys(h5: h5py.Group) -> str:
    first = list(itertools.islice(h5.keys(), 21))
    shown = ", ".join(printable(k, 60) for k in sorted(first[:20]))
    return f"{shown}, ..." if len(first) > 20 else shown or "nothing"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""  # unreachable


def _why(err: BaseException) -> str:
    return printable(f"{type(err).__name__}: {err}", 300)


def _read_names(path: Path) -> list[str]:
    """Class names, one per line, of ``shape_names.txt``."""
    try:
        if path.stat().st_size > NAMES_FILE_BYTES:
            raise DataError(printable(path), f"over {_size(NAMES_FILE_BYTES)}: not a list of class names")
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise DataError(printable(path), f"unreadable: {_why(err)}") from None
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


def _h5_files(path: str | Path) -> list[Path]:
    """The regular ``.h5`` files of ``path`` (a file, a directory or a glob); directories, FIFOs, devices
    and broken or looping links named like them are left out (reading a FIFO would block forever)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.h5") if regular_file(f))
    elif regular_file(p):
        files = [p]
    else:
        files = sorted(Path(f) for f in globlib.glob(str(path)) if regular_file(Path(f)))
    if not files:
        raise DataError(printable(path), "no .h5 files found")
    return files


def _open_h5(f: Path) -> h5py.File:
    try:
        return h5py.File(f, "r")
    except H5_ERRORS as err:
        raise DataError(
            printable(f), f"cannot open HDF5 file (truncated or corrupt?): {_why(err)}{_UNKNOWN_ROWS}"
        ) from err


def h5_format(spec: str | Path) -> str:
    """``"modelnet40"`` (``label`` [N, 1]) or ``"scanobjectnn"`` (``label`` [N]), judged by the first file
    whose labels can be looked at (``"modelnet40"`` when none can: reading names the bad files)."""
    for f in _h5_files(spec):
        try:
            with _open_h5(f) as h5:
                labels = _member(h5, "label", f)
                if isinstance(labels, h5py.Dataset):
                    return "modelnet40" if labels.ndim == 2 else "scanobjectnn"
        except H5_ERRORS:
            continue
    return "modelnet40"
