"""Where ``prepare`` writes: ``out`` and the preview path checked before any work, the files it will
replace checked before anything moves, and the commit that moves a finished dataset into place.

Only files prepare writes are ever replaced or deleted (shard-named files and its own reports inside
``out``); symbolic links are replaced as links, never followed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.shards.manifest import (
    MANIFEST,
    SKIPPED,
    file_exists,
    is_shard_name,
    is_symlink,
    join_uri,
    load_manifest_json,
    utf8_problem,
)
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve


def out_problem(out: str) -> str | None:
    """Why ``out`` cannot hold prepared shards (None: it can): it is not UTF-8, or it, or a folder above
    it, is a file."""
    problem = utf8_problem(out)
    if problem:
        return problem
    fs, root = resolve(out)
    if fs.get_file_info(root).type == pafs.FileType.File:
        return "is a file, not a directory"
    if isinstance(fs, pafs.LocalFileSystem):
        for parent in Path(root).parents:
            if parent.exists() or parent.is_symlink():
                return None if parent.is_dir() else f"{printable(parent)} is a file, not a directory"
    return None


def preview_problem(path: str) -> str | None:
    """Why a contact sheet cannot be written to ``path`` (None: it can), checked before any work."""
    p = Path(path)
    parent = p.parent
    if p.is_dir():
        return "is a directory"
    if not parent.is_dir():
        return f"the folder {printable(parent)} does not exist"
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return "is not writable"
    return None


def listed_shards(out: str) -> list[str]:
    """The shard file names an existing manifest lists (whatever else it lists is not prepare's to delete)."""
    try:
        files = load_manifest_json(out).get("files")
    except DataError:
        return []
    names = [f.get("path") for f in files if isinstance(f, dict)] if isinstance(files, list) else []
    return [n for n in names if isinstance(n, str) and is_shard_name(n)]


def check_destinations(fs: pafs.FileSystem, root: str, out: str, names: list[str]) -> None:
    """A :class:`DataError` when something at one of ``names`` in ``root`` is not a file prepare may replace:
    a directory, a FIFO, a device, a socket (a symbolic link is fine: a move replaces the link, never what it
    points to). Checked before anything moves, so a refusal leaves ``out`` as it was."""
    for name in names:
        path = f"{root}/{name}"
        if isinstance(fs, pafs.LocalFileSystem):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
                continue
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
        else:
            kind_of = fs.get_file_info(path).type
            if kind_of in (pafs.FileType.NotFound, pafs.FileType.File):
                continue
            kind = "a directory" if kind_of == pafs.FileType.Directory else "not a regular file"
        raise DataError(
            join_uri(out, name),
            f"is {kind}, not a regular file; prepare writes a file there: remove it or choose another --out",
        )


def commit_dataset(
    fs: pafs.FileSystem, root: str, tmp: str, manifest: dict[str, Any], old_shards: list[str], out: str = ""
) -> None:
    """Move the new files (and the manifest, already written in ``tmp``) into ``root``; delete the old
    dataset's shards that the new one does not replace (``old_shards``: plain shard names only, so
    nothing outside ``root`` and nothing prepare did not write; symbolic links are left alone).

    The manifest moves last: its presence means the dataset is complete.
    """
    new_names = {f["path"] for f in manifest["files"]} | {SKIPPED}
    check_destinations(fs, root, out or root, [*sorted(new_names), MANIFEST])  # before anything moves
    if file_exists(fs, f"{root}/{MANIFEST}"):
        fs.delete_file(f"{root}/{MANIFEST}")  # from here the old dataset no longer counts as complete
    for name in new_names:
        if file_exists(fs, f"{tmp}/{name}"):
            fs.move(f"{tmp}/{name}", f"{root}/{name}")
        elif file_exists(fs, f"{root}/{name}") and not is_symlink(fs, f"{root}/{name}"):
            fs.delete_file(f"{root}/{name}")  # a stale skipped report
    for name in old_shards:
        path = f"{root}/{name}"
        ours = is_shard_name(name) and name not in new_names and not is_symlink(fs, path)
        if ours and fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    fs.move(f"{tmp}/{MANIFEST}", f"{root}/{MANIFEST}")
