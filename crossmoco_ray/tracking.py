"""MLflow tracking: one run per pretraining run, resumed across relaunches; a no-op when disabled.

The driver creates (or resumes) the run and logs params, tags and the final artifacts; rank 0 of the
workers logs the per-step and per-epoch metrics into the same run by id. Everything goes through
``MlflowClient`` with an explicit run id, so no process depends on MLflow's global "active run".

Default store: ``sqlite:///<storage>/mlflow.db`` (MLflow 3 refuses the old ``./mlruns`` file store);
``MLFLOW_TRACKING_URI`` (a tracking server on clusters) or ``tracking.tracking_uri`` override it.

The exported backbone is logged as an MLflow PyTorch model (:meth:`Tracker.log_point_model`), optionally
registered; a run that cannot be resumed is an error naming it (:class:`ResumeError`), never a silent new run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossmoco_ray.errors import ConfigError, ResumeError

PARAM_CHUNK = 100  # MLflow's limit of params per batch call
PARAM_VALUE_MAX = 6000
MODEL_NAME = "point_encoder"  # the logged model's name in its run


def default_tracking_uri(storage_path: str, configured: str | None = None) -> str:
    """``configured`` ← ``MLFLOW_TRACKING_URI`` ← ``sqlite:///<storage>/mlflow.db`` (local storage only)."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in storage_path and not storage_path.startswith("file://"):
        raise ConfigError(
            f"storage {storage_path} is remote, and MLflow's default store (a sqlite file beside the runs) "
            "cannot live in a bucket. Point tracking at an MLflow server, one of:\n"
            "  - jobs (cluster/submit.sh): in cluster/runtime_env.yaml under env_vars, "
            'MLFLOW_TRACKING_URI: "http://<mlflow-host>:5000";\n'
            "  - this shell: export MLFLOW_TRACKING_URI=http://<mlflow-host>:5000;\n"
            "  - this run: tracking.tracking_uri=http://<mlflow-host>:5000;\n"
            "or run without MLflow: tracking.enabled=false. A server that keeps its artifacts in the same "
            "bucket: mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri postgresql://... "
            "--artifacts-destination s3://<bucket>/mlflow (docs/cluster.md)."
        )
    root = Path(storage_path.removeprefix("file://")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


@dataclass(frozen=True)
class LoggedModel:
    """A logged point-encoder model: ``model_uri`` (``models:/m-<id>``) and, when registered, its
    registered ``name`` and ``version`` (then also loadable as ``models:/<name>/<version>``)."""

    model_uri: str
    name: str | None = None
    version: str | None = None

    @property
    def registered_uri(self) -> str | None:
        return f"models:/{self.name}/{self.version}" if self.name and self.version else None


def _resume_error(
    run_id: str, uri: str, problem: str, record: str | None, recorded_uri: str | None
) -> ResumeError:
    where = record or "crossmoco_run.json in the run's storage directory"
    moved = (
        f" It was recorded with tracking URI {recorded_uri}." if recorded_uri and recorded_uri != uri else ""
    )
    return ResumeError(
        f"cannot resume MLflow run {run_id} from the tracking store {uri}: {problem}.{moved} The run's "
        f"record ({where}) says a previous launch logged to that MLflow run, and a new one would split "
        "its history, so no new MLflow run was created. Either point MLFLOW_TRACKING_URI (or "
        f"tracking.tracking_uri) at the store that holds run {run_id}, and make sure it is up; or start a "
        "new run under another name (--name, or tracking.run_name); or keep the checkpoints and log to a "
        f"new MLflow run: delete {where}."
    )


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
        *,
        record: str | None = None,
        recorded_uri: str | None = None,
    ) -> str | None:
        """Resume run ``resume_id`` if given, else create a run; returns its id.

        Resuming never falls back to a new run: a run missing from this store, deleted in MLflow, or a
        store that cannot be reached raises :class:`ResumeError` naming the run, the store and the fixes.
        ``record`` (the file that named the run) and ``recorded_uri`` (its store then) refine the message.
        """
        if self._client is None:
            return None
        if resume_id is not None:
            self._resume(resume_id, record, recorded_uri)
            return resume_id
        exp = self._client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(experiment)
        all_tags = dict(tags)
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self._client.create_run(exp_id, run_name=run_name, tags=all_tags)
        self.run_id = run.info.run_id
        self.log_params(params)
        return self.run_id

    def _resume(self, run_id: str, record: str | None, recorded_uri: str | None) -> None:
        from mlflow.exceptions import MlflowException

        assert self.uri is not None
        try:
            run = self._client.get_run(run_id)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                problem = "no such run in this store (the store moved, or points elsewhere than before)"
            else:  # a server that is down ends here too (INTERNAL_ERROR after MLflow's HTTP retries)
                problem = f"{err.error_code}: {err.message[:400]}"
            raise _resume_error(run_id, self.uri, problem, record, recorded_uri) from err
        except Exception as err:  # connection refused, DNS, timeouts: the requests/urllib3 family
            problem = f"the store cannot be reached ({type(err).__name__}: {err})"
            raise _resume_error(run_id, self.uri, problem, record, recorded_uri) from err
        if run.info.lifecycle_stage == "deleted":
            problem = (
                "the run was deleted in MLflow (to continue it, restore it first: "
                f"MLFLOW_TRACKING_URI={self.uri} mlflow runs restore --run-id {run_id})"
            )
            raise _resume_error(run_id, self.uri, problem, record, recorded_uri)
        self._client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

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

    def log_point_model(
        self,
        model: Any,
        example: Any,
        metadata: Mapping[str, Any],
        register: str | None = None,
        name: str = MODEL_NAME,
    ) -> LoggedModel | None:
        """Log a point-feature model (:func:`crossmoco_ray.checkpoints.encoders.exported_feature_model`
        builds it from ``crossmoco export`` / ``<run>/export``) as an MLflow PyTorch model of this run,
        traced on ``example`` (``[B, N, 3]`` float32), with a signature and ``metadata``; registered under
        ``register`` if given (a new version).

        The model maps points ``[B, N, 3]`` float32
        in any units → the pooled feature ``[B, F]`` float32 (F = 2·emb_dims for DGCNN: 2048 at the
        paper's width; emb_dims for PointNet), normalised as evaluation does. It is saved as ``"pt2"``
        (``torch.export``), not pickle:

        - it loads with ``mlflow.pytorch.load_model`` (a ``torch.fx.GraphModule``) or as a pyfunc without
          crossmoco-ray installed, and without MLflow 3's opt-in to unpickling
          (``MLFLOW_ALLOW_PICKLE_DESERIALIZATION``): a registry user runs no code from the file;
        - the signature's ``-1`` batch and point dimensions are exported as dynamic shapes (any B ≥ 1,
          any N ≥ k), so other batch sizes and point counts give the encoder's features; a pickled module
          would do so too, but only with this package importable and pickle allowed.

        The graph is traced on CPU from the encoder's reference EdgeConv (the same function and
        parameters as the fast path, which builds CPU-only sparse products and batch-size-dependent
        chunks): run it on CPU, or use ``load_point_encoder`` on the exported files for GPU inference.
        """
        if self._client is None or self.run_id is None:
            return None
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        with torch.no_grad():
            dim = int(model(torch.from_numpy(example)).shape[1])
        signature = ModelSignature(
            inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, 3))]),
            outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
        )
        metadata = {"crossmoco": {**metadata, "feature_dim": dim}}
        # Created here, in the run's experiment: log_model would put it in the process's active
        # experiment (MLflow's "Default" unless set globally) rather than the run's.
        run = self._client.get_run(self.run_id)
        target = self._client.create_logged_model(
            run.info.experiment_id, name=name, source_run_id=self.run_id, params=dict(run.data.params)
        )
        with _fluent_tracking_uri(self.uri):
            info = mlflow.pytorch.log_model(
                model,
                name=name,
                model_id=target.model_id,
                run_id=self.run_id,
                signature=signature,
                input_example=example,
                serialization_format="pt2",
                # the graph needs torch only; naming it skips MLflow's slow requirement inference
                pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
                metadata=metadata,
                registered_model_name=register,
            )
        version = info.registered_model_version
        return LoggedModel(info.model_uri, register, str(version) if version is not None else None)

    def end(self, status: str = "FINISHED") -> None:
        if self._client is not None and self.run_id is not None:
            self._client.set_terminated(self.run_id, status=status)

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        if self._client is None or self.run_id is None:
            return []
        return [(m.step, m.value) for m in self._client.get_metric_history(self.run_id, key)]


@contextmanager
def _fluent_tracking_uri(uri: str | None) -> Iterator[None]:
    """Point MLflow's process-global tracking URI (what ``mlflow.pytorch.log_model`` uses) at ``uri`` for
    a block, then restore it and ``MLFLOW_TRACKING_URI``, which ``set_tracking_uri`` also writes and
    :func:`default_tracking_uri` reads: a later run in this process must not inherit this run's store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils  # the global's only reader is private

    before, env_before = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)  # type: ignore[arg-type]
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # type: ignore[arg-type]  # None unsets it
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before
