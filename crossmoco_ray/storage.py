"""One place that reads and writes run storage: local paths and pyarrow-filesystem URIs alike.

Runs, shards, searches and exports live under a *storage* that is a local directory on a laptop and a bucket
(``s3://``, ``gs://``) or shared filesystem on a cluster. Everything that touches them goes through these
helpers, so there is one way to open a URI, one way to write a file atomically enough for our readers, and
one way to copy a local directory up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` for a local path or a pyarrow-filesystem URI (``s3://``, ``gs://``, ``file://``)."""
    if "://" not in uri:
        uri = str(Path(uri).expanduser().resolve())
    fs, path = pafs.FileSystem.from_uri(uri)
    return fs, path.rstrip("/")


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return bool(fs.get_file_info(path).type != pafs.FileType.NotFound)


def read_bytes(uri: str) -> bytes | None:
    """The file's bytes, or ``None`` when it does not exist."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        data: bytes = f.read()
    return data


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``, creating its parent directories."""
    fs, path = resolve(uri)
    if "/" in path:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


MAX_JSON_BYTES = 64 << 20  # a run's records (history, progress, run ids) are kilobytes to a few megabytes


def read_json(uri: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any] | None:
    """The JSON object in the file ``uri``, or ``None`` when it does not exist. A file over ``limit`` bytes,
    not UTF-8 JSON or not an object is a one-line ``ValueError`` naming it (records of a run can be damaged
    or replaced like any file)."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return None
    most = f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit} bytes"
    if info.size is not None and info.size > limit:
        raise ValueError(f"{uri}: {info.size} bytes, more than the {most} a record of a run may hold")
    with fs.open_input_stream(path) as f:
        data: bytes = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{uri}: more than the {most} a record of a run may hold")
    try:
        out = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{uri}: not a JSON record ({str(err)[:200]})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{uri}: holds a JSON {type(out).__name__}, not an object")
    return out


def write_json(uri: str, data: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(data, indent=1).encode())


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def publish_dir(local: str | Path, uri: str) -> str:
    """Copy a local directory to ``uri`` (a path or a URI); returns ``uri``."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return uri


def copy_to_local(uri: str, local: str | Path) -> Path:
    """Copy a directory at ``uri`` to the local directory ``local``; returns it."""
    fs, path = resolve(uri)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return Path(local)
