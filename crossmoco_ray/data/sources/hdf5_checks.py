"""The structural and safety checks of an HDF5 source file, made before any of its rows is read.

Every file may be damaged or hostile, so what it claims is checked first (:func:`inspect_h5`):

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
- Only regular files are opened (:func:`h5_files`): a FIFO named ``*.h5`` would block a read forever.
"""

from __future__ import annotations

import glob as globlib
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import regular_file
from crossmoco_ray.errors import DataError

MAX_CHUNK_BYTES = 64 * 1024**2  # HDF5 decompresses a chunk whole; writers use ≤ 1 MiB, so larger is refused
# A compressed dataset may claim at most this many times the bytes it stores: gzip (HDF5's compressor)
# shrinks even all-zero data only about 1030-fold. Claims under SMALL_CLAIM are read whatever they store:
# their memory is bounded anyway, and sorted labels compress very well.
MAX_RATIO = 1100
SMALL_CLAIM = 16 * 1024**2
LINK_DEPTH = 8  # soft links followed in a row, at most
NAME_CHARS = 200  # longest sample id taken from a 'name' dataset
H5_ERRORS = (OSError, RuntimeError, KeyError, TypeError, ValueError)  # what h5py raises on damaged files
UNKNOWN_ROWS = "; how many rows it held is unknown, so it counts as 1 skipped row"


@dataclass
class Layout:
    """What an HDF5 file holds, checked: its datasets, the rows it claims and the rows it really stores."""

    data: h5py.Dataset
    labels: h5py.Dataset
    names: h5py.Dataset | None
    rows: int  # rows 'data' declares
    readable: int  # leading rows stored in full in every dataset (fewer than ``rows`` in a file cut short)
    row_bytes: int  # bytes of one row of 'data'


def inspect_h5(h5: h5py.File, f: Path) -> Layout:
    """``data``, ``label`` and ``name`` of an open file, checked; or the :class:`DataError` that costs the
    whole file (``rows`` = the rows it declares, or 1 when even that is unknown)."""
    where = printable(f)
    data = member(h5, "data", f)
    if data is None:
        raise DataError(where, f"no 'data' dataset (found: {_keys(h5)}){UNKNOWN_ROWS}")
    if not isinstance(data, h5py.Dataset):
        raise DataError(where, f"'data' is {_kind(data)}, not a dataset{UNKNOWN_ROWS}")
    rows = int(data.shape[0]) if data.ndim else 0
    lost = max(rows, 1)
    if data.ndim != 3 or data.shape[1] < 1 or data.shape[2] < 3:
        raise DataError(where, f"'data' must be [N, P, 3], got {_shape(data)}", rows=lost)
    _numeric(data, "data", where, lost)
    labels = member(h5, "label", f)
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
    names = member(h5, "name", f)
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
    return Layout(data, labels, names, rows, readable, row_bytes)


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
    claim = f"'{key}' declares {rows} rows ({format_bytes(claimed)})"
    if layout == h5py.h5d.CHUNKED:
        chunk_bytes = math.prod(dset.chunks) * dset.dtype.itemsize
        if chunk_bytes > MAX_CHUNK_BYTES:
            raise DataError(
                where,
                f"'{key}' is stored in chunks of {format_bytes(chunk_bytes)}, over the "
                f"{format_bytes(MAX_CHUNK_BYTES)} that are decompressed at once",
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
                f"{claim} but stores only {format_bytes(stored)}, more than {MAX_RATIO}-fold less than any "
                "compression gives",
                rows=lost,
            )
        return rows  # a chunk cut off by truncation is named when its rows are read
    if layout == h5py.h5d.CONTIGUOUS:
        offset = dset.id.get_offset()
        if stored < claimed or offset is None:
            raise DataError(where, f"{claim} but stores only {format_bytes(stored)} of them", rows=lost)
        return min(rows, max(0, file_size - offset) // row_bytes)
    return rows  # compact: inside the object header, which HDF5 has read already


def member(h5: h5py.File, path: str, f: Path, depth: int = 0) -> Any:
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
            obj = member(h5, target, f, depth + 1)
            if obj is None:
                return None
        else:
            where = getattr(link, "filename", None)
            to = f" to {printable(where)}" if where is not None else ""
            raise DataError(
                printable(f),
                f"{printable(path)!r} is a link{to} outside the file; links to other files are not followed"
                + UNKNOWN_ROWS,
            )
    return obj


def _numeric(dset: h5py.Dataset, key: str, where: str, lost: int) -> None:
    try:
        kind = dset.dtype.kind if dset.dtype.fields is None else "V"
    except H5_ERRORS as err:  # a type numpy has no equivalent for
        raise DataError(
            where,
            f"'{key}' has an unreadable type: {describe_error(err)}; all {lost} rows skipped",
            rows=lost,
        ) from None
    if kind not in "iuf":
        raise DataError(
            where,
            f"'{key}' must hold numbers, got dtype {printable(dset.dtype)}; all {lost} rows skipped",
            rows=lost,
        )


def sample_id(value: Any) -> str | DataError:
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


def format_bytes(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return ""  # unreachable


def describe_error(err: BaseException) -> str:
    return printable(f"{type(err).__name__}: {err}", 300)


def h5_files(path: str | Path) -> list[Path]:
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


def open_h5(f: Path) -> h5py.File:
    try:
        return h5py.File(f, "r")
    except H5_ERRORS as err:
        raise DataError(
            printable(f),
            f"cannot open HDF5 file (truncated or corrupt?): {describe_error(err)}{UNKNOWN_ROWS}",
        ) from err
