"""MLflow tracking without Ray: the exported backbone as an MLflow model (logged, registered, loaded back
with the encoder's features), resumes that fail name the run instead of starting a new one, and remote
storage says which tracking URI to set."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmoco_ray.architecture import build_model
from crossmoco_ray.checkpoints.encoders import export_backbone, exported_feature_model, load_point_encoder
from crossmoco_ray.checkpoints.state import build_state, write_checkpoint
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.errors import ConfigError, ResumeError
from crossmoco_ray.evaluate.features import extract_features
from crossmoco_ray.pretrain.optim import build_optimizer
from crossmoco_ray.tracking import Tracker, default_tracking_uri

pytestmark = pytest.mark.timeout(180)

TINY = [
    "model.k=4", "model.emb_dims=16", "model.point_head_hidden=16", "model.proj_dim=8",
    "model.image_encoder=resnet18", "model.image_head_hidden=8", "data.num_points=32",
    "objective.queue_length=32", "train.batch_size=4", "train.num_workers=1", "eval.final=false",
]  # fmt: skip
FEATURE_DIM = 32  # DGCNN: 2 × emb_dims


def tiny_checkpoint(directory: Path) -> Path:
    """A real crossmoco-ray checkpoint of a tiny model whose weights differ from a fresh init."""
    cfg = load_config("quickstart", overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.point_q.parameters():
            p.mul_(1.05).add_(0.01)
        for name, buf in model.point_q.named_buffers():  # BatchNorm statistics away from (0, 1)
            if name.endswith("running_mean"):
                buf.add_(0.1)
    state = build_state(model, build_optimizer(cfg, model), cfg, epoch=1, step=8, lr=1e-3, mlflow_run_id="x")
    return write_checkpoint(directory, state, cfg)


def raw_clouds(batch: int, points: int, seed: int) -> np.ndarray:
    """Clouds in raw units far from the unit sphere: the model must normalise them as evaluation does."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((batch, points, 3)) * 250 + 40).astype(np.float32)


def reference_features(export: Path, clouds: np.ndarray) -> np.ndarray:
    """What the project's evaluation computes for ``clouds`` with the exported backbone."""
    loaded = load_point_encoder(export)
    return extract_features(loaded.encoder, clouds, progress=False, normalize=loaded.normalize)


def assert_same_features(model: torch.nn.Module, export: Path) -> None:
    """Same features as evaluation, for batch sizes and point counts other than the traced example."""
    for batch, points, seed in ((5, 40, 1), (1, 24, 2), (3, 64, 3)):
        clouds = raw_clouds(batch, points, seed)
        with torch.no_grad():
            got = model(torch.from_numpy(clouds)).numpy()
        assert got.shape == (batch, FEATURE_DIM)
        np.testing.assert_allclose(got, reference_features(export, clouds), rtol=1e-4, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No tracking URI from the environment, and no opt-in to unpickling models."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_logged_model_loads_back_with_the_encoders_features(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    export = export_backbone(tiny_checkpoint(tmp_path / "ckpt"), tmp_path / "export")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri)
    run_id = tracker.start("exp", "run", {"model.k": 4}, {})
    assert run_id is not None
    logged = tracker.log_point_model(*exported_feature_model(export), register="crossmoco-tiny")
    assert logged is not None
    assert logged.version == "1"
    assert logged.registered_uri == "models:/crossmoco-tiny/1"
    # Logging pointed MLflow's global URI at this store only for the call: a later run in this process
    # resolves its own store (default_tracking_uri reads MLFLOW_TRACKING_URI).
    assert "MLFLOW_TRACKING_URI" not in os.environ

    client = MlflowClient(tracking_uri=uri)
    model_id = logged.model_uri.removeprefix("models:/")
    assert client.get_logged_model(model_id).source_run_id == run_id
    assert client.get_logged_model(model_id).experiment_id == client.get_run(run_id).info.experiment_id
    assert client.get_model_version("crossmoco-tiny", "1").run_id == run_id

    clean_env.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve against the global store
    signature = mlflow.models.get_model_info(logged.model_uri).signature
    assert signature.inputs.inputs[0].shape == (-1, -1, 3)
    assert signature.inputs.inputs[0].type == np.dtype(np.float32)
    assert signature.outputs.inputs[0].shape == (-1, FEATURE_DIM)
    # Loaded without the pickle opt-in: the "pt2" graph runs no code from the file.
    for model_uri in (logged.model_uri, logged.registered_uri):
        assert_same_features(mlflow.pytorch.load_model(model_uri), export)


def test_disabled_tracker_logs_no_model(tmp_path: Path) -> None:
    assert Tracker(None).log_point_model(None, None, {}) is None


def test_resume_continues_the_same_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = Tracker(uri)
    run_id = first.start("exp", "run", {}, {})
    assert run_id is not None
    first.end("FAILED")
    again = Tracker(uri)
    assert again.start("exp", "run", {}, {}, resume_id=run_id) == run_id
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == 1


def test_resume_from_a_store_without_the_run_is_an_error_naming_it(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    old_uri = f"sqlite:///{tmp_path / 'old.db'}"
    run_id = Tracker(old_uri).start("exp", "run", {}, {})
    assert run_id is not None
    new_uri = f"sqlite:///{tmp_path / 'moved.db'}"
    record = f"{tmp_path}/runs/run/crossmoco_run.json"
    with pytest.raises(ResumeError) as caught:
        Tracker(new_uri).start("exp", "run", {}, {}, resume_id=run_id, record=record, recorded_uri=old_uri)
    message = str(caught.value)
    for expected in (run_id, new_uri, old_uri, "no such run", "MLFLOW_TRACKING_URI", "--name", record):
        assert expected in message
    assert isinstance(caught.value, ConfigError)  # the CLI reports it as a usage problem (exit 2)
    client = MlflowClient(tracking_uri=new_uri)  # and no run was created silently
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_resume_of_a_deleted_run_is_an_error(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = Tracker(uri).start("exp", "run", {}, {})
    assert run_id is not None
    MlflowClient(tracking_uri=uri).delete_run(run_id)
    with pytest.raises(ResumeError, match=f"(?s){run_id}.*deleted.*mlflow runs restore --run-id {run_id}"):
        Tracker(uri).start("exp", "run", {}, {}, resume_id=run_id)


def test_resume_against_a_server_that_is_down_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail in a second, not after ~4 minutes
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        ResumeError, match=f"(?s)run abc123 from the tracking store {uri}.*Connection refused"
    ):
        Tracker(uri).start("exp", "run", {}, {}, resume_id="abc123")


@pytest.mark.parametrize("storage", ["s3://bucket/runs", "gs://bucket/runs"])
def test_remote_storage_without_a_tracking_uri_says_what_to_set(
    storage: str, clean_env: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as caught:
        default_tracking_uri(storage)
    message = str(caught.value)
    for expected in (
        storage,
        "cluster/runtime_env.yaml",
        'MLFLOW_TRACKING_URI: "http://<mlflow-host>:5000"',
        "export MLFLOW_TRACKING_URI=http://<mlflow-host>:5000",
        "tracking.tracking_uri=http://<mlflow-host>:5000",
        "tracking.enabled=false",
    ):
        assert expected in message
    clean_env.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert default_tracking_uri(storage) == "http://mlflow:5000"
    assert default_tracking_uri(storage, "http://other:5000") == "http://other:5000"


def test_local_storage_defaults_to_sqlite_beside_the_runs(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    assert default_tracking_uri(str(tmp_path / "runs")) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert default_tracking_uri(f"file://{tmp_path}") == f"sqlite:///{tmp_path / 'mlflow.db'}"
