"""Evaluation data and frozen features.

Evaluation sets are small (ModelNet40: 12k clouds, 150 MB at 1024 points), so a split is loaded as one
array; features are computed in batches, in eval mode, without gradients, on CPU or GPU, with progress.
Sources: anything the readers open (h5, folders, ShapeNetRender; with ``up_axis``) or prepared shards.

Evaluation sees what training saw: every cloud is centred on its centroid and scaled to the unit sphere
before the encoder (training's first augmentation step), so data in raw units (millimetres, scanner
coordinates) evaluates as it trains, and an encoder's features do not change when its input is scaled
or shifted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.prepare.sample_checks import MIN_POINTS, check_label, check_points
from crossmoco_ray.data.progress import Progress
from crossmoco_ray.data.shards.integrity import open_split, read_row_groups
from crossmoco_ray.data.shards.manifest import MANIFEST, read_manifest
from crossmoco_ray.data.sources.base import MAX_COORDINATE, UpAxis
from crossmoco_ray.data.sources.formats import open_source
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from crossmoco_ray.nn.normalize import normalize_clouds
from crossmoco_ray.storage import resolve


@dataclass
class EvalSplit:
    """One labelled split: ``points`` [M, P, 3] float32, ``labels`` [M] int64, class names."""

    points: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    name: str

    def subset(self, count: int | None, seed: int = 0) -> EvalSplit:
        """At most ``count`` samples, chosen by a seeded permutation (all when ``count`` is None)."""
        if count is None or count >= len(self.labels):
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(len(self.labels))[:count])
        return EvalSplit(self.points[idx], self.labels[idx], self.class_names, self.name)


def is_shards(spec: str) -> bool:
    """Whether ``spec`` is a prepared-shard directory or URI (it has a manifest)."""
    if "://" in spec:
        fs, root = resolve(spec)
        return fs.get_file_info(f"{root}/{MANIFEST}").type.name != "NotFound"
    return (Path(spec) / MANIFEST).is_file()


def available_splits(spec: str, up_axis: str = "y", variant: str | None = None) -> list[str]:
    """The splits of prepared shards (from the manifest) or of a source (``variant``: ScanObjectNN's)."""
    if is_shards(spec):
        return sorted(read_manifest(spec)["counts"])
    return open_source(spec, up_axis=up_axis, variant=variant).splits()  # type: ignore[arg-type]


def load_split(
    spec: str,
    split: str,
    *,
    fmt: str = "auto",
    up_axis: UpAxis = "y",
    num_points: int | None = None,
    variant: str | None = None,
) -> EvalSplit:
    """Split ``split`` of a source or of prepared shards, the first ``num_points`` points of each cloud.

    The first points, not a random subset, as CrossPoint's SVM protocol does (``data[:1024]``).

    A source (not shards) is validated as ``prepare`` validates it, by the same checks
    (:func:`~crossmoco_ray.data.prepare.sample_checks.check_points`,
    :func:`~crossmoco_ray.data.prepare.sample_checks.check_label`), and the
    first ``num_points`` points are checked again, being what the encoder sees: a NaN cloud, a stray label or
    a degenerate cut is a :class:`DataError` naming the file and index, not an SVM error or a wrong kNN score.
    """
    if is_shards(spec):
        points, labels, names = _load_shards(spec, split)
    else:
        source = open_source(spec, fmt, up_axis=up_axis, variant=variant)
        if split not in source.splits():
            raise DataError(printable(spec), f"no {split!r} split (has {source.splits()})")
        names, hint = source.class_names(), source.label_hint()
        clouds, labs = [], []
        for item in source.samples(split):
            if isinstance(item, DataError):
                raise item
            if item.label is None:
                raise DataError(item.source, "evaluation needs labels", item.index)
            cloud = check_points(item, MIN_POINTS)
            labs.append(check_label(item, names, hint))
            if num_points is not None and num_points < len(cloud):
                cloud = cloud[:num_points]
                try:
                    check_points(replace(item, points=cloud), min(MIN_POINTS, num_points))
                except DataError as err:
                    raise DataError(
                        err.source,
                        f"{err.problem} in its first {num_points} points (what is evaluated)",
                        err.index,
                    ) from None
            clouds.append(cloud)
        if not clouds:
            raise DataError(printable(spec), f"the {split!r} split holds no samples")
        if len({c.shape[0] for c in clouds}) > 1:
            raise DataError(
                printable(spec), "clouds have different point counts; pass num_points to cut them to one size"
            )
        points, labels = np.stack(clouds), np.asarray(labs, np.int64)
    if num_points is not None:
        if points.shape[1] < num_points:
            raise DataError(spec, f"clouds have {points.shape[1]} points, {num_points} asked for")
        points = points[:, :num_points]
    names = names or [str(c) for c in range(int(labels.max()) + 1)]
    return EvalSplit(np.ascontiguousarray(points, np.float32), labels, list(names), split)


def _load_shards(root: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Points and labels of one split of prepared shards, every file and row group checked against the
    manifest before it is used (as training reads them: :mod:`crossmoco_ray.data.shards.integrity`).

    The seal and digests prove only that the files match the manifest, and anyone can seal a manifest, so
    the rows are checked as ``prepare`` checks a source (whole arrays at once; the first bad row goes through
    :func:`~crossmoco_ray.data.prepare.sample_checks.check_points` /
    :func:`~crossmoco_ray.data.prepare.sample_checks.check_label` for
    the same message): finite coordinates within ``MAX_COORDINATE``, labels in
    ``0..len(class_names) - 1``, or, without class names, below the number of classes the manifest's
    per-class counts name. A :class:`DataError` names the shard file and row.
    """
    manifest = read_manifest(root)
    if not any(f["split"] == split for f in manifest["files"]):
        raise DataError(root, f"no {split!r} shards (has {sorted({f['split'] for f in manifest['files']})})")
    fs, shards = open_split(root, manifest, split)
    names = manifest.get("class_names")
    if names is None:  # as many classes as the per-class counts name (a placeholder name each)
        counted = {
            key
            for count in manifest["counts"].values()
            if isinstance(count, dict) and isinstance(count.get("per_class"), dict)
            for key in count["per_class"]
        }
        bound: list[str] = [""] * len(counted)
    else:
        bound = names
    points, labels = [], []
    for shard in shards:
        table = read_row_groups(fs, shard, list(range(shard.metadata.num_row_groups)), ["points", "label"])
        pts = table.column("points").combine_chunks().to_numpy_ndarray()
        labs = table.column("label").to_numpy().astype(np.int64)
        if (labs == -1).all() and len(labs):
            raise DataError(root, "the shards are unlabelled; evaluation needs labels")
        bad_points = ~np.isfinite(pts).all(axis=(1, 2))
        bad_points |= np.nan_to_num(np.abs(pts), posinf=0.0).max(axis=(1, 2), initial=0.0) > MAX_COORDINATE
        bad_labels = (labs < 0) | (labs >= len(bound))
        for bad, check in ((bad_points, "points"), (bad_labels, "label")):
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                sample = Sample(id="", points=pts[row], label=int(labs[row]), source=shard.where, index=row)
                if check == "points":
                    check_points(sample, 1)
                else:
                    check_label(sample, bound)
                raise DataError(shard.where, f"row with bad {check}", row)  # not reached
        points.append(pts)
        labels.append(labs)
    return np.concatenate(points), np.concatenate(labels), names


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    points: np.ndarray,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    what: str = "features",
    progress: bool = True,
    normalize: bool = True,
) -> np.ndarray:
    """Pooled backbone features ``[M, F]`` (float32) of ``points`` [M, P, 3], eval mode, no gradient.

    Clouds are normalised as in training first (``normalize``; see the module docstring). The encoder's
    mode and device are restored afterwards (the training monitor calls this mid-run).
    """
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    was_training = encoder.training
    first = next(encoder.parameters())
    home = first.device
    encoder.eval().to(dev)
    out = []
    bar = Progress(what, len(points)) if progress else None
    try:
        for start in range(0, len(points), batch_size):
            batch = torch.from_numpy(points[start : start + batch_size]).to(dev, torch.float32)
            if normalize:
                batch = normalize_clouds(batch.double()).float()  # float64: raw units (1e3…1e6) stay exact
            feats = encoder.forward_features(batch)  # type: ignore[operator]
            out.append(feats.float().cpu().numpy())
            if bar:
                bar.update(len(batch))
    finally:
        encoder.train(was_training).to(home)
        if bar:
            bar.close()
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
