"""Shard files read back checked against their manifest (and the digests the manifest records of them).

**Every byte of a shard lies in exactly one digested range**: the file is cut into its row groups (row group
``i`` from the end of row group ``i − 1``, byte 0 for the first, to the end of its last column chunk) and
the footer (the rest: Parquet's metadata, its length and magic), and the manifest records the sha256 of
each (``row_group_sha256``, ``footer_sha256``) beside the whole file's size and sha256
(:func:`file_digests`, called by the writer).

Readers (the training pipeline, evaluation, prepare's re-run check) use nothing unchecked:

- :func:`open_shard` checks a file when it is opened: it exists as a plain file of the listed size, its
  footer matches its digest, and the footer's metadata agrees with the manifest (rows, the shard schema,
  the point count as the shape of the ``points`` tensor type);
- :func:`read_row_groups` reads a row group's bytes, checks their digest, and decodes *only those bytes*
  (:class:`_Verified` serves the decoder nothing else) with the checked footer, so a flipped byte anywhere
  (data pages, page headers, the views column, the footer) is an error before its rows are used. It costs
  one sha256 over the bytes read and no extra I/O (bench/verify_cost.py). A whole-file sha256 per epoch
  would read every file a second time each epoch; Parquet's own page checksums (which prepare also writes,
  for other tools) cover neither the page headers nor the footer.

Files prepared before these digests existed (a manifest with size + sha256 per file only) are still read:
each file is checked whole against its sha256 when it is opened, once per dataset. Every failure is a
:class:`~.types.DataError` naming the file and the reason.

:func:`check_shards` is the quick look ``prepare`` takes before it calls a dataset up to date;
``crossmoco verify``'s full check is :mod:`.verify`.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.shards.manifest import (
    CHUNK,
    MANIFEST,
    failure_text,
    file_digest,
    is_symlink,
    join_uri,
    sha256_hex,
    shard_schema,
    stores_meshes,
)
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve

MAGIC = b"PAR1"

# ---- byte ranges, footer, metadata ----


def read_footer(handle: Any, size: int) -> tuple[int, bytes]:
    """(offset of the footer, the footer's bytes to the end of the file) of an open Parquet file."""
    if size < 12:
        raise ValueError(f"{size} bytes: too short to be a Parquet file")
    tail = handle.read_at(8, size - 8)
    if len(tail) != 8 or tail[4:] != MAGIC:
        raise ValueError("no Parquet footer at the end (truncated, or not a Parquet file)")
    length = int.from_bytes(tail[:4], "little")
    if length > size - 12:
        raise ValueError(f"its footer claims {length} bytes, more than the file holds")
    start = size - 8 - length
    footer = handle.read_at(length + 8, start)
    if len(footer) != length + 8:
        raise ValueError("the footer could not be read whole")
    return start, bytes(footer)


def parse_footer(footer: bytes) -> pq.FileMetaData:
    """Parquet metadata from footer bytes alone (nothing else of the file is read)."""
    return pq.read_metadata(pa.BufferReader(MAGIC + footer))


def row_group_ranges(meta: pq.FileMetaData, footer_start: int) -> list[tuple[int, int]]:
    """``[start, end)`` of every row group: from the end of the one before (byte 0 for the first) to the
    end of its last column chunk; the last ends where the footer starts, so every byte is in one range."""
    ranges, end = [], 0
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        starts, ends = [], []
        for c in range(group.num_columns):
            col = group.column(c)
            first = col.dictionary_page_offset if col.has_dictionary_page else col.data_page_offset
            starts.append(first)
            ends.append(first + col.total_compressed_size)
        if not starts or min(starts) < end or max(ends) <= end:
            raise ValueError(f"row group {g} is not laid out after row group {g - 1} (not a shard's layout)")
        ranges.append((end, max(ends)))
        end = max(ends)
    if end != footer_start:
        raise ValueError(f"{footer_start - end} bytes between the last row group and the footer")
    return ranges


def file_digests(fs: pafs.FileSystem, path: str) -> dict[str, Any]:
    """What the manifest records of a shard file: ``bytes``, ``sha256``, ``footer_sha256`` and
    ``row_group_sha256`` (one per row group; module docstring), in one pass over the file."""
    size = fs.get_file_info(path).size
    with fs.open_input_file(path) as handle:
        start, footer = read_footer(handle, size)
    ranges = row_group_ranges(parse_footer(footer), start)
    whole, digests, pos = hashlib.sha256(), [hashlib.sha256() for _ in ranges], 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            for h, (lo, hi) in zip(digests, ranges, strict=True):
                if lo < pos + len(chunk) and hi > pos:
                    h.update(chunk[max(lo - pos, 0) : hi - pos])
            pos += len(chunk)
    return {
        "bytes": pos,
        "sha256": whole.hexdigest(),
        "footer_sha256": sha256_hex(footer),
        "row_group_sha256": [h.hexdigest() for h in digests],
    }


def check_schema(schema: pa.Schema, num_points: int, meshes: bool = False) -> None:
    """The columns the readers use, of the shard schema's types, and points of ``[num_points, 3]``
    (with ``meshes``, the ``mesh`` column too)."""
    want = shard_schema(num_points, meshes=True)
    points = schema.field("points").type if "points" in schema.names else None
    shape = getattr(points, "shape", None)
    if shape is not None and list(shape) != [num_points, 3]:
        raise ValueError(f"points are {list(shape)} in the file, the manifest says {num_points} points")
    for name in ("id", "label", "points", "views", *(("mesh",) if meshes else ())):
        if name not in schema.names:
            raise ValueError(f"no {name!r} column")
        if schema.field(name).type != want.field(name).type:
            raise ValueError(f"column {name!r} is {printable(schema.field(name).type, 80)}, not a shard's")


@dataclass
class ShardFile:
    """One shard file as its manifest entry lists it, opened and checked (:func:`open_shard`): its verified
    footer travels with it (read tasks decode with it instead of the file's own), its metadata is parsed
    from that footer once per process."""

    where: str  # the file as messages name it (the dataset's URI / name)
    path: str  # on the filesystem
    entry: dict[str, Any]
    size: int
    footer: bytes
    ranges: list[tuple[int, int]] = field(default_factory=list)  # empty for files without row-group digests
    _meta: pq.FileMetaData | None = field(default=None, repr=False, compare=False)

    @property
    def metadata(self) -> pq.FileMetaData:
        if self._meta is None:
            self._meta = parse_footer(self.footer)
        return self._meta

    @property
    def digested(self) -> bool:
        """Whether every row group has its own digest (files prepared since they exist)."""
        return "row_group_sha256" in self.entry

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_meta": None}  # re-parsed where it lands


def open_shard(
    fs: pafs.FileSystem,
    uri: str,
    entry: dict[str, Any],
    num_points: int,
    whole: bool = True,
    meshes: bool = False,
) -> ShardFile:
    """Open the shard of a manifest entry (of the manifest at ``uri``, read by :func:`read_manifest`) and
    check it: it exists, has the listed size, its footer matches the manifest's digest, and its metadata
    the entry (rows) and the dataset (schema, ``num_points``). Files without row-group digests (prepared
    before them) are checked whole against their sha256 when ``whole``."""
    _, root = resolve(uri)
    where, path = join_uri(uri, entry["path"]), f"{root}/{entry['path']}"
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(where, "missing (listed in the manifest, not on disk): re-run `crossmoco prepare`")
    if info.type != pafs.FileType.File or is_symlink(fs, path):
        raise DataError(where, "not a plain file")
    size = info.size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise DataError(where, f"{size} bytes, the manifest says {entry['bytes']} (truncated or changed)")
    try:
        footer_changed = "its footer (Parquet metadata) differs from the manifest: damaged or changed"
        with fs.open_input_file(path) as handle:
            try:
                start, footer = read_footer(handle, size)
            except ValueError as err:
                if "footer_sha256" in entry:
                    raise DataError(where, f"{footer_changed} ({failure_text(err)})") from err
                raise
        if "footer_sha256" in entry and sha256_hex(footer) != entry["footer_sha256"]:
            raise DataError(where, footer_changed)
        shard = ShardFile(where, path, entry, size, footer)
        meta = shard.metadata
        if meta.num_rows != entry["rows"]:
            raise DataError(where, f"the manifest says {entry['rows']} rows, the file holds {meta.num_rows}")
        check_schema(meta.schema.to_arrow_schema(), num_points, meshes)
        if shard.digested:
            shard.ranges = row_group_ranges(meta, start)
            if len(entry["row_group_sha256"]) != len(shard.ranges):
                raise DataError(
                    where,
                    f"{len(shard.ranges)} row groups, the manifest has "
                    f"{len(entry['row_group_sha256'])} row-group digests",
                )
    except DataError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        raise DataError(where, failure_text(err)) from err
    if whole and not shard.digested:
        if "sha256" not in entry:
            raise DataError(where, "the manifest has no checksum for it: re-run `crossmoco prepare`")
        if file_digest(fs, path)[1] != entry["sha256"]:
            raise DataError(where, "sha256 differs from the manifest (damaged or changed)")
    return shard


class _Verified(io.RawIOBase):
    """A read-only file of which only checked byte ranges can be read (the Parquet decoder reads through it,
    so it decodes nothing that was not checked)."""

    def __init__(self, size: int, pieces: Iterable[tuple[int, Any]]) -> None:
        super().__init__()
        self._size, self._pos = size, 0
        self._pieces = sorted(((start, memoryview(data)) for start, data in pieces), key=lambda p: p[0])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else self._pos + pos if whence == 1 else self._size + pos
        return self._pos

    def tell(self) -> int:
        return self._pos

    def read(self, n: int | None = -1) -> Any:
        """``n`` bytes from the position: a view into one checked piece (no copy), or the bytes of
        adjacent pieces joined."""
        want = self._size - self._pos if n is None or n < 0 else n
        parts, pos = [], self._pos
        for start, data in self._pieces:
            if want and start <= pos < start + len(data):
                part = data[pos - start : pos - start + want]
                parts.append(part)
                pos, want = pos + len(part), want - len(part)
        if want:
            raise OSError(f"read at byte {self._pos} reaches outside the checked row groups")
        self._pos = pos
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _runs(indices: list[int]) -> list[list[int]]:
    """Sorted distinct ``indices`` cut into runs of consecutive row groups (each run is one read)."""
    runs: list[list[int]] = []
    for g in sorted(set(indices)):
        if runs and runs[-1][-1] == g - 1:
            runs[-1].append(g)
        else:
            runs.append([g])
    return runs


def _read_checked(handle: Any, shard: ShardFile, run: list[int]) -> pa.Buffer:
    """The bytes of consecutive row groups ``run``, read at once, each checked against its digest."""
    lo, hi = shard.ranges[run[0]][0], shard.ranges[run[-1]][1]
    handle.seek(lo)
    data = handle.read_buffer(hi - lo)  # an Arrow buffer: no copy into a Python bytes object
    view = memoryview(data)
    for g in run:
        start, end = shard.ranges[g]
        if lo + len(view) < end:
            raise DataError(shard.where, f"row group {g} is cut short (truncated)")
        if sha256_hex(view[start - lo : end - lo]) != shard.entry["row_group_sha256"][g]:
            raise DataError(shard.where, f"row group {g} differs from the manifest: damaged or changed")
    return data


def read_row_groups(
    fs: pafs.FileSystem,
    shard: ShardFile,
    indices: list[int],
    columns: list[str] | None = None,
    page_checksums: bool = False,
) -> pa.Table:
    """Row groups ``indices`` of an opened shard, each checked against its digest before it is decoded
    (files without row-group digests were checked whole when opened). ``page_checksums``: also check
    Parquet's page checksums (``crossmoco verify``)."""
    try:
        with fs.open_input_file(shard.path) as handle:
            if not shard.digested:
                return pq.ParquetFile(
                    handle, metadata=shard.metadata, page_checksum_verification=page_checksums
                ).read_row_groups(indices, columns=columns)
            pieces = [(shard.ranges[run[0]][0], _read_checked(handle, shard, run)) for run in _runs(indices)]
        # No pre-buffering: it would coalesce reads across the unchecked gaps between the row groups asked.
        source = pa.PythonFile(_Verified(shard.size, pieces), mode="r")
        reader = pq.ParquetFile(
            source, metadata=shard.metadata, pre_buffer=False, page_checksum_verification=page_checksums
        )
        return reader.read_row_groups(indices, columns=columns)
    except DataError:
        raise
    except (OSError, ValueError, IndexError, pa.ArrowException) as err:
        raise DataError(shard.where, f"unreadable: {failure_text(err)}") from err


def open_split(uri: str, manifest: dict[str, Any], split: str) -> tuple[pafs.FileSystem, list[ShardFile]]:
    """Every shard of ``split``, opened and checked (:func:`open_shard`); their rows must add up to the
    split's count."""
    fs, _ = resolve(uri)
    shards = [
        open_shard(fs, uri, f, manifest["num_points"], meshes=stores_meshes(manifest))
        for f in manifest["files"]
        if f["split"] == split
    ]
    held = sum(s.metadata.num_rows for s in shards)
    total = manifest["counts"].get(split, {}).get("total")
    if shards and held != total:
        raise DataError(
            join_uri(uri, MANIFEST), f"split {split!r} counts {total} rows, its files hold {held}"
        )
    return fs, shards


# ---- the quick check of a whole dataset ----


def check_shards(uri: str, manifest: dict[str, Any]) -> DataError | None:
    """The first problem a cheap look finds in the shards of a read manifest (every file there, of its
    size, its footer's digest and metadata matching): what ``prepare`` checks before "up to date"."""
    fs, _ = resolve(uri)
    for entry in manifest["files"]:
        try:
            open_shard(fs, uri, entry, manifest["num_points"], whole=False, meshes=stores_meshes(manifest))
        except DataError as err:
            return err
    return None
