"""The config against the prepared data, before anything starts: a bad combination fails here with its
fix, not hours into training (issue: bad configs fail before any worker starts)."""

from __future__ import annotations

from typing import Any

from crossmoco_ray import storage
from crossmoco_ray.config.schema import Config
from crossmoco_ray.data.pipeline.batches import expected_distinct_labels
from crossmoco_ray.data.shards.manifest import MANIFEST, read_manifest
from crossmoco_ray.errors import ConfigError


def check_data(cfg: Config, root: str, manifest: dict[str, Any]) -> int:
    """Config vs. prepared data, before anything starts; returns the steps per epoch."""
    problems = []
    if "train" not in manifest["counts"]:
        problems.append(f"{root} has no train split (has {sorted(manifest['counts'])})")
    if cfg.data.num_points > manifest["num_points"]:
        problems.append(
            f"data.num_points={cfg.data.num_points} but the shards hold {manifest['num_points']} points per "
            f"cloud; set data.num_points={manifest['num_points']} (or prepare with more points)"
        )
    views = manifest.get("views_per_object") or 0
    kind, wanted = viewpoints_kind(cfg, manifest), cfg.data.views_per_sample
    if kind == "stored" and wanted > views:
        fix = (
            "set data.render.viewpoints=fresh (rendered in the pipeline) or prepare with more views"
            if views == 0
            else f"set data.views_per_sample={views} or data.render.viewpoints=fresh"
        )
        problems.append(f"data.views_per_sample={wanted} but the shards have {views} views per object; {fix}")
    grid = len(cfg.data.render.azimuths) * len(cfg.data.render.elevations)
    if kind == "fixed" and wanted > grid:
        problems.append(
            f"data.views_per_sample={wanted} but data.render.viewpoints=fixed has a grid of {grid} "
            "(data.render.azimuths x elevations); add azimuths or use viewpoints=fresh"
        )
    if problems:
        raise ConfigError("\n".join(problems))
    world, batch = cfg.train.num_workers, cfg.per_worker_batch
    rows = manifest["counts"]["train"]["total"]
    steps = (rows // world) // batch
    if steps == 0:
        raise ConfigError(
            f"{rows} training objects give no full step of {cfg.global_batch} (the global batch: "
            f"{batch} per worker x {world} workers); lower train.batch_size_per_worker / train.batch_size "
            "or use more data"
        )
    return steps


def viewpoints_kind(cfg: Config, manifest: dict[str, Any] | None) -> str:
    """``data.render.viewpoints`` with ``auto`` decided: fresh (rendered in the pipeline) where the shards
    hold no renders (``prepare --store meshes``), else stored (too few stored views per object is then an
    error of :func:`check_data`, not a silent switch to other images)."""
    kind = cfg.data.render.viewpoints
    if kind != "auto":
        return kind
    return "fresh" if manifest is not None and manifest.get("views_per_object") == 0 else "stored"


def check_eval_data(spec: str, up_axis: str, variant: str | None = None) -> None:
    """``eval.data`` must open and hold a labelled train split, before any worker starts."""
    from crossmoco_ray.data.sources.formats import open_source

    if storage.exists(f"{spec}/{MANIFEST}"):
        splits = sorted(read_manifest(spec)["counts"])
    else:
        splits = open_source(spec, up_axis=up_axis, variant=variant).splits()  # type: ignore[arg-type]
    if "train" not in splits:
        raise ConfigError(
            f"eval.data={spec} has no train split (has {splits}); the monitor fits on train and scores on "
            "val (carved from train when there is none)"
        )


def unlabelled(manifest: dict[str, Any]) -> bool:
    """Whether prepared shards hold no labels (every object −1: a corpus prepared without classes)."""
    per_class = [name for split in manifest["counts"].values() for name in split.get("per_class", {})]
    return not manifest.get("class_names") and all(name == "-1" for name in per_class)


def label_evaluation_note(cfg: Config, manifest: dict[str, Any], root: str) -> str | None:
    """The one line that says the monitor is off because the pretraining shards are unlabelled and no
    ``eval.data`` is set (``None`` when it can run)."""
    if cfg.eval.data is not None or not unlabelled(manifest):
        return None
    return (
        f"{root} is unlabelled: the monitor and the final evaluation are off (they score features by "
        "labels); set eval.data to a labelled set (prepared shards or a source, e.g. ModelNet40) to score "
        "the encoder"
    )


def iid_batch_classes(cfg: Config, manifest: dict[str, Any]) -> float:
    """Distinct labels an i.i.d. worker batch of the train split would hold (what ``batch_classes`` is
    compared with); 0 for unlabelled data."""
    per_class = manifest["counts"].get("train", {}).get("per_class", {})
    counts = [n for name, n in per_class.items() if name != "-1"]
    return expected_distinct_labels(counts, cfg.per_worker_batch) if counts else 0.0
