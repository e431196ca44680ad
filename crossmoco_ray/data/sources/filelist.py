"""``list``: a corpus given as a text file of object files, local paths or URIs, one a line.

::

    # files.txt: comments and blank lines are ignored
    glbs/000-023/8476c4170df24cf5bbe6967222d1a42d.glb
    /data/scans/chair_0001.ply
    file:///data/scans/chair_0002.npy
    s3://bucket/objaverse/glbs/000-023/9a6b1f0e2c0d4e7f8a1b2c3d4e5f6a7b.glb

A relative path is relative to the list's own folder (or, for a list given as a URI, to its URI's folder).
URIs are ``file://``, ``s3://``, ``gs://`` (``gcs://``), read through ``pyarrow.fs`` with the credentials
pyarrow finds; a URI with a query or fragment (``?``, ``#``) is refused, since pyarrow would take filesystem
options (``endpoint_override``...) from it. An optional second column, after a **tab**, is the object's
class name (``chairs/0001.off<TAB>chair``): then every line must have one, the classes are the sorted
distinct names and the objects are labelled; without it the corpus is unlabelled (label −1). Every object
is in one split, ``train`` (``--val-fraction`` carves ``val``). An object's id is its line as written.

The list is read once, by the driver, bounded (:data:`LIST_BYTES`, :data:`LIST_ENTRIES`); the files it
names are not looked at there: tasks are runs of :data:`TASK_LINES` lines that carry their own entries, and
each task reads its files (``prepare --ray`` spreads them over the cluster). So a line whose file is
missing, a line over :data:`LINE_BYTES` bytes, a line that is not UTF-8 or holds control characters, and
an unsupported or malformed URI are each named with the list's line number when that line is read, and
skipped with ``--skip-bad`` like any bad object. Re-running ``prepare`` recognises a changed list (its
sha256), not a file that changed behind an unchanged line.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from crossmoco_ray import storage
from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.base import Source
from crossmoco_ray.data.sources.corpus import PLY_PROBES, chunks, ply_has_faces, read_local
from crossmoco_ray.data.sources.gltf import Sibling
from crossmoco_ray.data.sources.mesh import MESH_SUFFIXES, folder_reader
from crossmoco_ray.data.sources.objects import FILE_BYTES, OBJECT_SUFFIXES, Sampling, object_sample
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError

LIST_BYTES = 1024**3  # a list file larger than this is refused (10M lines of ~100 bytes)
LIST_ENTRIES = 20_000_000  # objects one list may name
LINE_BYTES = 4096  # a longer line is not a path
TASK_LINES = 32  # lines per task of prepare --ray
SCHEMES = ("file", "s3", "gs", "gcs")
SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Entry:
    """One line of a list: where its file is (a local path or a URI), or why it cannot be read."""

    line: int
    text: str  # the line as written: the object's id
    location: str = ""  # an absolute local path, or a URI
    label: int | None = None
    problem: str = ""


class ListSource(Source):
    """The objects a list file names (see the module docstring), unlabelled unless it has a class column.

    Args:
        spec: the list: a local path or a URI (``s3://bucket/files.txt``).
        sampling: the up axis and how points are drawn on meshes.
    """

    format = "list"

    def __init__(self, spec: str, sampling: Sampling | None = None) -> None:
        self.spec, self.sampling = spec, sampling or Sampling()
        self.remote = SCHEME.match(spec) is not None and not spec.startswith("file://")
        self.name = posixpath.basename(spec.rstrip("/")) or spec
        self._fs: dict[str, pafs.FileSystem] = {}
        data = self._read_list()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.entries, self.classes = self._parse(data)
        if not self.entries:
            raise DataError(printable(spec), "the list names no files (one path or URI a line)")
        self._has_meshes: bool | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tasks carry their own entries: Ray's tasks get the source without the whole list.
        return {**self.__dict__, "entries": [], "_fs": {}}

    # ------------------------------------------------------------------------------------------ the list

    def _read_list(self) -> bytes:
        where = printable(self.spec)
        try:
            fs, path = storage.resolve(self.spec)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid (a malformed URI) is a ValueError
            raise DataError(where, f"cannot read the list ({printable(err, 200)})") from None
        return _read_fs(fs, path, where, LIST_BYTES, "a list")

    def _base(self) -> str:
        """What relative lines are relative to: the list's folder (a local path, or the URI's folder)."""
        if self.remote:
            return self.spec.rsplit("/", 1)[0]
        local = _local_path(self.spec) if self.spec.startswith("file://") else self.spec
        return os.path.dirname(os.path.abspath(local))

    def _parse(self, data: bytes) -> tuple[list[Entry], list[str] | None]:
        where, base = printable(self.spec), self._base()
        rows: list[tuple[int, str, str | None, str]] = []  # line, path, class name, problem
        for number, raw in enumerate(data.split(b"\n"), start=1):
            raw = raw.removesuffix(b"\r")
            if len(raw) > LINE_BYTES:
                rows.append((number, f"line {number}", None, f"a line over {LINE_BYTES} bytes"))
                continue
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                rows.append((number, f"line {number}", None, "not valid UTF-8"))
                continue
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t")
            if len(fields) > 2 or CONTROL.search(line.replace("\t", "")):
                problem = "more than two tab-separated columns" if len(fields) > 2 else "control characters"
                rows.append((number, f"line {number}", None, problem))
                continue
            rows.append((number, fields[0].strip(), fields[1].strip() if len(fields) == 2 else None, ""))
            if len(rows) > LIST_ENTRIES:
                raise DataError(where, f"names more than {LIST_ENTRIES} objects")
        named = [r for r in rows if not r[3]]
        labelled = {r[2] is not None for r in named}
        if len(labelled) > 1:
            first = next(r for r in named if (r[2] is None) != (named[0][2] is None))
            raise DataError(
                where,
                f"line {first[0]} {'has no' if first[2] is None else 'has a'} class column but line "
                f"{named[0][0]} {'has one' if named[0][2] is not None else 'has none'}: label every line "
                "(path<TAB>class) or none",
            )
        classes = sorted({r[2] for r in named if r[2]}) if labelled == {True} else None
        index = {c: i for i, c in enumerate(classes or [])}
        entries = []
        for number, text, cls, problem in rows:
            label = index.get(cls) if cls is not None else None
            if cls is not None and label is None:
                problem = "an empty class name"
            if problem:
                entries.append(Entry(number, text, problem=problem))
                continue
            location, problem = self._locate(text, base)
            entries.append(Entry(number, text, location, label, problem))
        return entries, classes

    def _locate(self, text: str, base: str) -> tuple[str, str]:
        """Where a line's file is (an absolute local path or a URI), or why it cannot be read."""
        scheme = SCHEME.match(text)
        if scheme:
            if scheme.group(1).lower() not in SCHEMES:
                return (
                    "",
                    f"URI scheme {printable(scheme.group(1), 20)!r}: only {', '.join(SCHEMES)} are read",
                )
            if scheme.group(1).lower() == "file":
                return _local_path(text), ""
            if "?" in text or "#" in text:  # pyarrow reads options (endpoint_override...) from a query
                return (
                    "",
                    "a URI with a query or fragment (? or #): filesystem options are not read from lists",
                )
            return text, ""
        if self.remote:
            return posixpath.normpath(f"{base}/{text}").replace(":/", "://", 1), ""
        return os.path.normpath(os.path.join(base, text)), ""

    # ---------------------------------------------------------------------------------------- Source API

    def splits(self) -> list[str]:
        return ["train"]

    def class_names(self) -> list[str] | None:
        return self.classes

    def count(self, split: str) -> int | None:
        return len(self.entries)

    def has_meshes(self) -> bool:
        if self._has_meshes is None:
            suffixes = [_suffix(e.location) for e in self.entries if e.location]
            plys = [e for e in self.entries if e.location and _suffix(e.location) == ".ply"][:PLY_PROBES]
            self._has_meshes = any(s in MESH_SUFFIXES for s in suffixes) or any(
                ply_has_faces(self._head(e), e.text) for e in plys
            )
        return self._has_meshes

    def identity(self) -> dict[str, Any]:
        s = self.sampling
        spec = self.spec if SCHEME.match(self.spec) else os.path.abspath(self.spec)
        out: dict[str, Any] = {
            "format": self.format,
            "list": spec,
            "list_sha256": self.sha256,
            "up_axis": s.up_axis,
        }
        if self.has_meshes():
            out["mesh_sampling"] = {"points": s.mesh_points, "seed": s.seed, "fps": s.fps}
        return out

    def tasks(self, split: str) -> list[Any]:
        return chunks(self.entries, TASK_LINES)

    def read_task(self, split: str, task: Any) -> Iterator[Sample | DataError]:
        for entry in task:
            yield self.read(split, entry)

    def read(self, split: str, entry: Entry) -> Sample | DataError:
        """The sample of one line's file (or the :class:`DataError` naming the file and the line)."""
        where = f"{printable(entry.location or entry.text)} ({printable(self.name, 60)} line {entry.line})"
        if entry.problem:
            return DataError(where, entry.problem)
        suffix = _suffix(entry.location)
        if suffix not in OBJECT_SUFFIXES:
            return DataError(where, f"not a point or mesh file ({' '.join(OBJECT_SUFFIXES)})")
        try:
            if SCHEME.match(entry.location):
                data, sibling = self._read_uri(entry.location, where)
            else:
                path = Path(entry.location)
                data, sibling = read_local(path, where), folder_reader(path.parent, where)
            return object_sample(data, suffix, where, entry.text, entry.label, split, self.sampling, sibling)
        except DataError as err:
            return err

    # ------------------------------------------------------------------------------------------- URIs

    def _filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """``uri``'s filesystem (one per bucket, made once per process: making one can cost a request)
        and its path on it (``bucket/key`` for S3 and GCS, as ``FileSystem.from_uri`` gives it)."""
        parts = urlsplit(uri)
        key = f"{parts.scheme}://{parts.netloc}"
        path = f"{parts.netloc}{unquote(parts.path)}"
        if key not in self._fs:
            fs, first = storage.resolve(uri)
            self._fs[key] = fs
            return fs, first
        return self._fs[key], path

    def _read_uri(self, uri: str, where: str) -> tuple[bytes, Sibling]:
        try:
            fs, path = self._filesystem(uri)
        except (OSError, ValueError) as err:  # a malformed URI (``s3:///key``) is pyarrow's ArrowInvalid
            raise DataError(where, f"not a readable URI ({printable(err, 200)})") from None
        return _read_fs(fs, path, where, FILE_BYTES, "a file"), _fs_reader(fs, posixpath.dirname(path), where)

    def _head(self, entry: Entry) -> bytes:
        try:
            if SCHEME.match(entry.location):
                fs, path = self._filesystem(entry.location)
                with fs.open_input_stream(path) as f:
                    head: bytes = f.read(1 << 16)
                return head
            with open(entry.location, "rb") as fp:
                return fp.read(1 << 16)
        except (OSError, ValueError):
            return b""


def _suffix(location: str) -> str:
    return posixpath.splitext(location.rsplit("/", 1)[-1])[1].lower()


def _local_path(uri: str) -> str:
    parts = urlsplit(uri)
    return (
        unquote(parts.path) if parts.netloc in ("", "localhost") else f"//{parts.netloc}{unquote(parts.path)}"
    )


def _read_fs(fs: pafs.FileSystem, path: str, where: str, limit: int, what: str) -> bytes:
    """A file's bytes through ``fs``, at most ``limit`` (checked before and while it is read); ``what`` names
    the file in errors."""
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(where, "not found")
        if info.type != pafs.FileType.File:
            raise DataError(where, "not a file")
        if info.size is not None and info.size > limit:
            raise DataError(where, f"{what} of {info.size} bytes (over {limit // 1024**2} MiB)")
        with fs.open_input_stream(path) as f:
            data: bytes = f.read(limit + 1)
    except DataError:
        raise
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(where, f"cannot read {what} ({printable(err, 200)})") from None
    if len(data) > limit:
        raise DataError(where, f"{what} over {limit // 1024**2} MiB")
    return data


def _fs_reader(fs: pafs.FileSystem, folder: str, where: str) -> Sibling:
    """Reads a file beside a mesh on ``fs`` by a relative name :func:`.gltf.safe_relative` passed (no ``..``,
    no absolute path: it stays below the mesh's folder)."""

    def read(name: str) -> bytes:
        return _read_fs(fs, f"{folder}/{name}", f"{where}: {printable(name, 80)}", FILE_BYTES, "a file")

    return read
