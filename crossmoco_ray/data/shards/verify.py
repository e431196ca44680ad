"""``crossmoco verify``: the full check of a prepared dataset, every problem reported instead of the first.

The manifest (form, seal, paths, counts), then every file with the read-time checks of :mod:`.integrity`
(size, footer, metadata against the manifest, every row group's digest), plus Parquet's page checksums,
the whole file's sha256, the labels against the per-class counts and the views per object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.shards.integrity import open_shard, read_row_groups
from crossmoco_ray.data.shards.manifest import (
    MANIFEST,
    check_form,
    file_digest,
    is_shard_name,
    join_uri,
    load_manifest_json,
    manifest_problems,
    stores_meshes,
)
from crossmoco_ray.data.shards.meshes import decode_mesh
from crossmoco_ray.errors import DataError
from crossmoco_ray.storage import resolve


@dataclass
class VerifyReport:
    """What :func:`verify_dataset` found: ``problems`` empty means no damage."""

    files: int = 0
    rows: int = 0
    bytes: int = 0
    damaged_files: set[str] = field(default_factory=set)
    problems: list[DataError] = field(default_factory=list)


def verify_dataset(uri: str, progress: Callable[[str], None] | None = None) -> VerifyReport:
    """The full check of ``crossmoco verify``: the manifest (form, seal, paths, counts), then every file
    (size, footer, metadata against the manifest, every row group's digest, Parquet's page checksums,
    the whole file's sha256, the labels against the per-class counts, the views per object).

    Raises :class:`DataError` only when ``uri`` is not a dataset at all (no manifest, not one this version
    reads); every damage found is in the report.
    """
    manifest = load_manifest_json(uri)
    check_form(manifest, join_uri(uri, MANIFEST))
    report = VerifyReport(files=len(manifest["files"]))
    report.problems += manifest_problems(manifest, uri)
    fs, _ = resolve(uri)
    labels: dict[str, dict[int, int]] = {}
    held: dict[str, int] = {}
    broken_splits: set[str] = set()
    seen: set[str] = set()
    for entry in manifest["files"]:
        if not isinstance(entry["split"], str) or not is_shard_name(entry["path"], entry["split"]):
            continue  # reported by manifest_problems; never opened
        if entry["path"] in seen:
            continue  # listed twice: reported by manifest_problems
        seen.add(entry["path"])
        if progress:
            progress(entry["path"])
        found = _verify_file(fs, uri, entry, manifest, labels)
        if found:
            report.problems += found
            report.damaged_files.add(entry["path"])
            broken_splits.add(entry["split"])
        else:
            held[entry["split"]] = held.get(entry["split"], 0) + entry["rows"]
            report.rows += entry["rows"]
            report.bytes += entry.get("bytes") or 0
    where = join_uri(uri, MANIFEST)
    for split, count in manifest["counts"].items() if isinstance(manifest["counts"], dict) else []:
        if split in broken_splits or not isinstance(count, dict):
            continue
        if count.get("total") != held.get(split, 0):
            report.problems.append(
                DataError(
                    where,
                    f"split {printable(split, 40)!r} counts {printable(count.get('total'), 40)} rows, "
                    f"its files hold {held.get(split, 0)}",
                )
            )
        names = manifest["class_names"]
        in_files = {
            (names[k] if isinstance(names, list) and 0 <= k < len(names) else str(k)): v
            for k, v in sorted(labels.get(split, {}).items())
        }
        if isinstance(count.get("per_class"), dict) and in_files != count["per_class"]:
            report.problems.append(
                DataError(
                    where,
                    f"split {printable(split, 40)!r}: its files' labels differ from the per-class counts",
                )
            )
    return report


def _verify_file(
    fs: pafs.FileSystem,
    uri: str,
    entry: dict[str, Any],
    manifest: dict[str, Any],
    labels: dict[str, dict[int, int]],
) -> list[DataError]:
    """The problems of one listed file (at most one per kind; none: sound), counting its labels into
    ``labels`` when it is sound."""
    try:
        shard = open_shard(
            fs, uri, entry, manifest["num_points"], whole=False, meshes=stores_meshes(manifest)
        )
    except DataError as err:
        return [err]
    out: list[DataError] = []
    views, fewest = manifest["views_per_object"], None
    counts: dict[int, int] = {}
    for g in range(shard.metadata.num_row_groups):  # one row group in memory at a time
        try:
            table = read_row_groups(fs, shard, [g], page_checksums=True)  # decodes every page
        except DataError as err:
            out.append(err)
            continue
        if table.num_rows:
            least = pc.min(pc.list_value_length(table.column("views"))).as_py()
            fewest = least if fewest is None else min(fewest, least)
        for label in table.column("label").to_pylist():
            counts[label] = counts.get(label, 0) + 1
        if stores_meshes(manifest) and not out:
            out.extend(_mesh_problems(table, shard.where))
    if not out and file_digest(fs, shard.path)[1] != entry.get("sha256"):
        out.append(DataError(shard.where, "sha256 differs from the manifest (damaged or changed)"))
    if not out and views is not None and fewest is not None and fewest < views:
        out.append(
            DataError(shard.where, f"a row holds {fewest} views, the manifest says {views} per object")
        )
    if not out:
        split = labels.setdefault(entry["split"], {})
        for label, n in counts.items():
            split[label] = split.get(label, 0) + n
    return out


def _mesh_problems(table: pa.Table, where: str) -> list[DataError]:
    """The first mesh cell of a row group that does not decode (none: all do)."""
    for sid, cell in zip(table.column("id").to_pylist(), table.column("mesh").to_pylist(), strict=True):
        if cell is not None:
            try:
                decode_mesh(cell, f"{where}: object {printable(sid, 80)}")
            except DataError as err:
                return [err]
    return []


def verify_shards(uri: str) -> None:
    """:func:`verify_dataset`, raising the first problem it finds as a :class:`DataError`."""
    report = verify_dataset(uri)
    if report.problems:
        raise report.problems[0]
