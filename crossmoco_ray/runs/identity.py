"""A run's identity: where it lives (``<storage>/<name>``), user paths made absolute on the driver, and its
MLflow run with the record that lets a relaunch continue it.

Relaunching the same name resumes the run (Ray Train's auto-resume plus ``progress.json``), and its MLflow
run continues: the record file beside the checkpoints names it. Everything here runs on the driver, before
Ray starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from crossmoco_ray import storage
from crossmoco_ray.tracking import Tracker

DEFAULT_STORAGE = "crossmoco_runs"


def resolve_storage(spec: str | None) -> str:
    spec = spec or os.environ.get("CROSSMOCO_STORAGE") or DEFAULT_STORAGE
    return spec if "://" in spec else str(Path(spec).expanduser().resolve())


def absolute(spec: str | None) -> str | None:
    """A user's path as an absolute one, resolved here on the driver (Ray Train workers run in their own
    working directory, so ``data/mn40`` would not be found there); URIs and ``None`` pass through."""
    if spec is None or "://" in spec or spec == "synthetic":
        return spec
    return str(Path(spec).expanduser().resolve())


def open_tracking(
    tracking_uri: str | None,
    run_dir: str,
    record_file: str,
    experiment: str,
    name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    *,
    parent_id: str | None = None,
    record: Mapping[str, Any] | None = None,
) -> Tracker:
    """Create the MLflow run (nested under ``parent_id`` if given), or resume the one a previous launch of
    this run used, as its record ``<run_dir>/<record_file>`` names (an error naming that run when it cannot
    be resumed); then write the record (with ``record``'s extra fields)."""
    tracker = Tracker(tracking_uri)
    path = f"{run_dir}/{record_file}"
    previous = storage.read_json(path) or {}
    run_id = tracker.start(
        experiment,
        name,
        dict(params),
        dict(tags),
        resume_id=previous.get("mlflow_run_id"),
        parent_id=parent_id,
        record=path,
        recorded_uri=previous.get("tracking_uri"),
    )
    storage.write_json(path, {"mlflow_run_id": run_id, "tracking_uri": tracker.uri, **(record or {})})
    return tracker
