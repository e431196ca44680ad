"""The manifest of prepared shards: reading it back checked.

``<out>/manifest.json`` records the schema version, counts per split and class, class names, point count,
views per object, the render settings and, per shard file, its rows, size, sha256 and the digests of its
footer and row groups (:mod:`.integrity`); written by :func:`.shards.prepare`, last, so its presence means
the dataset is complete. Bad samples that ``prepare --skip-bad`` left out are listed in
``<out>/skipped.json``.

A manifest may be damaged or hostile, so :func:`read_manifest` (which every reader uses: the training
pipeline, evaluation, prepare) checks it before anything uses it:

- it is sealed: ``manifest_sha256`` is the digest of the rest of it (canonical JSON, all but the creation
  time), so an edited count, point count or fingerprint is noticed;
- its file paths are plain shard names (``<split>-<nnnnn>.parquet`` of the entry's own split): nothing
  absolute, no ``..``, no directory part, and not a symbolic link where the filesystem has them, so no
  reader opens, and no ``prepare --overwrite`` deletes, anything outside the shard directory;
- its counts add up (files per split against the split totals, classes against the totals) and its values
  have their types. Every message shows a value read from it bounded.

Manifests written before the seal existed (no ``manifest_sha256``, no row-group digests) are read as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from crossmoco_ray.bounded import printable
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.json"
SEAL = "manifest_sha256"
SHARD_NAME = re.compile(r"(?P<split>[A-Za-z0-9_]+)-[0-9]{5,}\.parquet")
CHUNK = 1 << 22
# A manifest of 2,000 shard files with per-class counts of 1,000 classes in three splits is ~1.3 MB; parsing
# JSON costs ~25x its size in memory, so a bound well above real manifests keeps a hostile one cheap.
MAX_MANIFEST_BYTES = 16 * 1024**2
NOT_UTF8 = "the path is not UTF-8 (pyarrow's filesystems need UTF-8 paths): rename it"


def utf8_problem(uri: str) -> str | None:
    """Why ``uri`` cannot be opened through pyarrow (None: it can): a name that is not UTF-8 (it reaches
    Python as lone surrogates, which pyarrow cannot encode)."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        return NOT_UTF8
    return None


def read_regular(fs: pafs.FileSystem, path: str, limit: int, where: str) -> bytes | None:
    """At most ``limit + 1`` bytes of the regular file ``path`` (None when nothing is there).

    Anything else at the name is a :class:`DataError` before a byte is read: a directory, a FIFO (a read
    would wait forever), a device (``/dev/zero`` never ends), and on a local filesystem a symbolic link
    (not followed: ``O_NOFOLLOW``; opened ``O_NONBLOCK`` and checked with ``fstat`` on the open file, so a
    swap after the check cannot substitute a FIFO).
    """
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None
        except OSError:
            if os.path.islink(path):
                raise DataError(where, "is a symbolic link, not a regular file") from None
            if os.path.isdir(path):
                raise DataError(where, "is a directory, not a regular file") from None
            raise
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
                raise DataError(where, f"is {kind}, not a regular file")
            chunks, size = [], 0
            while size <= limit and (chunk := os.read(fd, min(CHUNK, limit + 1 - size))):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type != pafs.FileType.File:
        raise DataError(where, "is not a regular file")
    with fs.open_input_stream(path) as f:
        data: bytes = f.read(limit + 1)
    return data


def join_uri(uri: str, name: str) -> str:
    """``name`` inside the directory ``uri`` (a path or URI; a trailing ``/`` on ``uri`` is not doubled)."""
    return f"{uri.rstrip('/')}/{name}"


def file_exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` exists on an already resolved ``fs`` (for loops over many files of one dataset)."""
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def is_shard_name(name: object, split: str | None = None) -> bool:
    """Whether ``name`` is a plain shard file name (``<split>-<nnnnn>.parquet``; of ``split`` when given):
    no directory part, nothing that could leave the shard directory."""
    match = SHARD_NAME.fullmatch(name) if isinstance(name, str) else None
    return match is not None and (split is None or match["split"] == split)


def is_symlink(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is a symbolic link (only a local filesystem has them)."""
    return isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path)


def file_digest(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file on ``fs``, read in chunks."""
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def sha256_hex(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the manifest ----


def _canonical(manifest: dict[str, Any]) -> bytes:
    # Everything a reader relies on; not the creation time, so that the same command on the same source
    # seals the same manifest (prepare --ray is checked against the local path that way).
    rest = {k: v for k, v in manifest.items() if k not in (SEAL, "created")}
    return json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its seal (the digest of everything else in it), as prepare writes it."""
    return {**{k: v for k, v in manifest.items() if k != SEAL}, SEAL: sha256_hex(_canonical(manifest))}


def load_manifest_json(uri: str) -> dict[str, Any]:
    """The manifest at ``uri`` parsed, with no check beyond being a JSON object (:class:`DataError` when it
    is missing or not that)."""
    where = join_uri(uri, MANIFEST)
    problem = utf8_problem(uri)
    if problem:
        raise DataError(uri, problem)
    try:
        fs, path = resolve(where)
        data = read_regular(fs, path, MAX_MANIFEST_BYTES, where)
        if data is not None and len(data) > MAX_MANIFEST_BYTES:
            raise DataError(
                where,
                f"over {MAX_MANIFEST_BYTES >> 20} MiB: too large for a manifest (not one prepare wrote)",
            )
        manifest = None if data is None else json.loads(data.decode())
    except (OSError, ValueError, RecursionError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(where, f"unreadable manifest: {failure_text(err)}") from err
    if data is None:
        raise DataError(where, "no manifest: not a prepared dataset (run `crossmoco prepare`)")
    if not isinstance(manifest, dict):
        raise DataError(where, "the manifest is not a JSON object")
    return manifest


def check_form(manifest: dict[str, Any], where: str) -> None:
    """What makes a JSON object a manifest this version reads (else nothing else can be checked)."""
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            where,
            f"schema version {printable(version, 40)}, this crossmoco-ray reads {SCHEMA_VERSION}: "
            "re-run `crossmoco prepare`",
        )
    for key in ("files", "num_points", "views_per_object", "counts", "class_names"):
        if key not in manifest:
            raise DataError(where, f"the manifest lacks {key!r}")
    if not isinstance(manifest["files"], list):
        raise DataError(where, "'files' is not a list")
    for i, info in enumerate(manifest["files"]):
        if not isinstance(info, dict) or not {"path", "split", "rows"} <= set(info):
            raise DataError(where, "file entry needs path, split and rows", i)


def manifest_problems(manifest: dict[str, Any], uri: str) -> list[DataError]:
    """Everything wrong with a manifest of the right form (:func:`check_form`): its paths (against the shard
    directory at ``uri``), its seal, its counts. Empty when it is sound."""
    where = join_uri(uri, MANIFEST)
    fs, root = resolve(uri)
    out: list[DataError] = []
    seen: set[str] = set()
    for i, info in enumerate(manifest["files"]):
        path, split, rows = info["path"], info["split"], info["rows"]
        if not isinstance(split, str) or not is_shard_name(path, split):
            out.append(
                DataError(
                    where,
                    f"path {printable(path, 80)!s} is not a shard of this directory "
                    f"(a plain {printable(split, 40)}-<nnnnn>.parquet name)",
                    i,
                )
            )
        elif path in seen:
            out.append(DataError(where, f"{path} is listed twice", i))
        elif is_symlink(fs, f"{root}/{path}"):
            out.append(DataError(join_uri(uri, path), "is a symbolic link; shards must be plain files here"))
        else:
            seen.add(path)
        if not _count(rows):
            out.append(DataError(where, f"rows {printable(rows, 40)} is not a count", i))
        digests = info.get("row_group_sha256", [])
        if not (
            _count(info.get("bytes", 0))
            and all(isinstance(info.get(k, ""), str) for k in ("sha256", "footer_sha256"))
            and isinstance(digests, list)
            and all(isinstance(d, str) for d in digests)
        ):
            out.append(DataError(where, "file entry with a malformed size or digest", i))
    if SEAL in manifest:
        if manifest[SEAL] != sha256_hex(_canonical(manifest)):
            out.append(DataError(where, "the manifest was edited or damaged (it differs from its seal)"))
    elif any("footer_sha256" in f for f in manifest["files"]):
        out.append(DataError(where, f"the manifest lost its seal ({SEAL}): damaged or edited"))
    out += _count_problems(manifest, where)
    return out


def _count_problems(manifest: dict[str, Any], where: str) -> list[DataError]:
    counts, out = manifest["counts"], []
    if not isinstance(counts, dict):
        return [DataError(where, "'counts' is not an object")]
    listed: dict[str, int] = {}
    for info in manifest["files"]:
        if isinstance(info["split"], str) and _count(info["rows"]):
            listed[info["split"]] = listed.get(info["split"], 0) + info["rows"]
    for split in sorted(set(listed) | set(counts), key=str):
        count = counts.get(split)
        total = count.get("total") if isinstance(count, dict) else None
        per_class = count.get("per_class") if isinstance(count, dict) else None
        if total != listed.get(split, 0):
            out.append(
                DataError(
                    where,
                    f"split {printable(split, 40)!r} counts {printable(total, 40)} rows, "
                    f"its files list {listed.get(split, 0)}",
                )
            )
        elif (
            isinstance(per_class, dict) and sum(v for v in per_class.values() if isinstance(v, int)) != total
        ):
            out.append(DataError(where, f"split {split!r}: the per-class counts do not add up to {total}"))
    num_points, views, names = manifest["num_points"], manifest["views_per_object"], manifest["class_names"]
    if not _count(num_points) or num_points < 1:
        out.append(DataError(where, f"num_points {printable(num_points, 40)} is not a point count"))
    if views is not None and not _count(views):
        out.append(DataError(where, f"views_per_object {printable(views, 40)} is not a count"))
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        out.append(DataError(where, "class_names is not a list of names"))
    if "meshes" in manifest and not isinstance(manifest["meshes"], bool):
        out.append(DataError(where, f"meshes {printable(manifest['meshes'], 40)} is not true or false"))
    return out


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of prepared shards at ``uri``, checked (form, paths, seal, counts; module docstring);
    :class:`DataError` names what is wrong."""
    manifest = load_manifest_json(uri)
    check_form(manifest, join_uri(uri, MANIFEST))
    problems = manifest_problems(manifest, uri)
    if problems:
        raise problems[0]
    return manifest


def failure_text(err: BaseException) -> str:
    """A library's error as one bounded line."""
    text = " ".join(str(err).split()) or type(err).__name__
    return printable(text, 300)


def shard_schema(num_points: int, meshes: bool = False) -> pa.Schema:
    """The Arrow schema of a shard whose clouds have ``num_points`` points each; with ``meshes``, a ``mesh``
    column of :mod:`.meshes` cells (null for objects without one)."""
    return pa.schema(
        [
            ("id", pa.string()),
            ("label", pa.int32()),
            ("split", pa.string()),
            ("points", pa.fixed_shape_tensor(pa.float32(), [num_points, 3])),
            ("views", pa.list_(pa.binary())),
            *([("mesh", pa.binary())] if meshes else []),
        ]
    )


def stores_meshes(manifest: dict[str, Any]) -> bool:
    """Whether the dataset's shards hold a ``mesh`` column (``prepare --store meshes|both``)."""
    return manifest.get("meshes") is True
