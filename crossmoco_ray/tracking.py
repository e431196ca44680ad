"""MLflow tracking: one run per pretraining run, resumed across relaunches; a no-op when disabled.

The driver creates (or resumes) the run and logs params, tags and the final artifacts; rank 0 of the
workers logs the per-step and per-epoch metrics into the same run by id. Everything goes through
``MlflowClient`` with an explicit run id, so no process depends on MLflow's global "active run".

Default store: ``sqlite:///<storage>/mlflow.db`` (MLflow 3 refuses the old ``./mlruns`` file store);
``MLFLOW_TRACKING_URI`` (a tracking server on clusters) or ``tracking.tracking_uri`` override it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import ConfigError

PARAM_CHUNK = 100  # MLflow's limit of params per batch call
PARAM_VALUE_MAX = 6000


def default_tracking_uri(storage_path: str, configured: str | None = None) -> str:
    """``configured`` ← ``MLFLOW_TRACKING_URI`` ← ``sqlite:///<storage>/mlflow.db`` (local storage only)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage_path and not storage_path.startswith("file://"):
        raise ConfigError(
            f"storage {storage_path} is remote, so the default sqlite store cannot live there: set "
            "MLFLOW_TRACKING_URI to a tracking server (or tracking.tracking_uri), or tracking.enabled=false"
        )
    root = Path(storage_path.removeprefix("file://")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


class Tracker:
    """Thin MLflow client bound to one run; every method is a no-op when ``uri`` is None."""

    def __init__(self, uri: str | None, run_id: str | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self._client: Any = None
        if uri is not None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=uri)

    @property
    def enabled(self) -> bool:
        return self._client is not None

    def start(
        self,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        resume_id: str | None = None,
        parent_id: str | None = None,
    ) -> str | None:
        """Resume ``resume_id`` when it exists in this store, else create a run; returns its id."""
        if self._client is None:
            return None
        if resume_id is not None:
            try:
                self._client.get_run(resume_id)
                self._client.update_run(resume_id, status="RUNNING")
                self.run_id = resume_id
                return resume_id
            except Exception:
                pass
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
        all_tags = dict(tags)
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if self._client is None or self.run_id is None:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:PARAM_VALUE_MAX]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_CHUNK):
            self._client.log_batch(self.run_id, params=items[i : i + PARAM_CHUNK])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._client is not None and self.run_id is not None:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if self._client is None or self.run_id is None:
            return
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if items:
            self._client.log_batch(self.run_id, metrics=items)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None and self.run_id is not None:
            p = Path(path)
            if p.is_dir():
                self._client.log_artifacts(self.run_id, str(p), artifact_path)
            else:
                self._client.log_artifact(self.run_id, str(p), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if self._client is None or self.run_id is None:
            return []
        return [(m.step, m.value) for m in self._client.get_metric_history(self.run_id, key)]
