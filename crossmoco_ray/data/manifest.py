"""The manifest of prepared shards: reading it back checked, and checking the shards against it.

``<out>/manifest.json`` records the schema version, counts per split and class, class names, point count,
views per object, the render settings and a size + sha256 per shard file (written by
:func:`.shards.prepare`, last, so its presence means the dataset is complete). Bad samples that
``prepare --skip-bad`` left out are listed in ``<out>/skipped.json``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow.fs as pafs

from ..storage import read_bytes, resolve
from .types import DataError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SKIPPED = "skipped.json"


def join_uri(uri: str, name: str) -> str:
    """``name`` inside the directory ``uri`` (a path or URI; a trailing ``/`` on ``uri`` is not doubled)."""
    return f"{uri.rstrip('/')}/{name}"


def file_exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` exists on an already resolved ``fs`` (for loops over many files of one dataset)."""
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def file_digest(fs: pafs.FileSystem, path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file on ``fs``, read in chunks."""
    h, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def read_manifest(uri: str) -> dict[str, Any]:
    """The manifest of prepared shards at ``uri``, checked; :class:`DataError` names what is wrong."""
    where = f"{uri}/{MANIFEST}"
    try:
        data = read_bytes(join_uri(uri, MANIFEST))
        manifest = None if data is None else json.loads(data.decode())
    except (OSError, ValueError) as err:
        raise DataError(where, f"unreadable manifest: {err}") from err
    if data is None:
        raise DataError(where, "no manifest: not a prepared dataset (run `crossmoco prepare`)")
    if not isinstance(manifest, dict):
        raise DataError(where, "the manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(
            where,
            f"schema version {version!r}, this crossmoco-ray reads {SCHEMA_VERSION}: "
            "re-run `crossmoco prepare`",
        )
    for key in ("files", "num_points", "views_per_object", "counts", "class_names"):
        if key not in manifest:
            raise DataError(where, f"the manifest lacks {key!r}")
    for i, info in enumerate(manifest["files"]):
        if not isinstance(info, dict) or not {"path", "split", "rows"} <= set(info):
            raise DataError(where, "file entry needs path, split and rows", i)
    return manifest


def verify_shards(uri: str) -> None:
    """Check every shard's size and sha256 against the manifest (:class:`DataError` on the first mismatch)."""
    manifest = read_manifest(uri)
    fs, root = resolve(uri)
    for i, info in enumerate(manifest["files"]):
        path = f"{root}/{info['path']}"
        if not file_exists(fs, path):
            raise DataError(f"{uri}/{MANIFEST}", f"lists {info['path']}, which is missing", i)
        size, digest = file_digest(fs, path)
        if (size, digest) != (info.get("bytes"), info.get("sha256")):
            raise DataError(
                f"{uri}/{info['path']}", "checksum differs from the manifest (changed or truncated)"
            )
