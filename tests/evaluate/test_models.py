"""Export → import round trip; CrossPoint / CrossMoCo formats; mismatches name the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossmoco_ray.evaluate.models import export_backbone, load_point_encoder


def features(encoder: torch.nn.Module, points: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval().forward_features(points)


def test_checkpoint_loads_the_online_encoder(checkpoint: tuple[Path, torch.nn.Module]) -> None:
    path, model = checkpoint
    loaded = load_point_encoder(path)
    assert loaded.source == "checkpoint"
    assert loaded.info["epoch"] == 3
    assert loaded.info["mlflow_run_id"] == "abc"
    points = torch.randn(3, 32, 3)
    torch.testing.assert_close(features(loaded.encoder, points), features(model.point_q, points))


def test_export_import_round_trip(checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, model = checkpoint
    out = export_backbone(path, tmp_path / "export", with_image=True)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["architecture"] == "dgcnn"
    assert meta["feature_dim"] == 32
    assert meta["source_run"] == "abc"
    assert meta["image_encoder"] == "resnet18"
    payload = torch.load(out / "backbone.pt", weights_only=True)
    assert not any(k.startswith("inv_head.") for k in payload["point_encoder"])  # backbone only
    assert "conv1.weight" in payload["image_encoder"]
    loaded = load_point_encoder(out)
    assert loaded.source == "backbone"
    points = torch.randn(3, 32, 3)
    torch.testing.assert_close(features(loaded.encoder, points), features(model.point_q, points))


def test_crossmoco_q_k_list_and_module_prefix(
    checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, model = checkpoint
    q = {f"module.{k}": v for k, v in model.point_q.state_dict().items()}
    k = {f"module.{k}": v for k, v in model.point_k.state_dict().items()}
    torch.save([q, k], tmp_path / "best_model.pth")  # CrossMoCo's best_model.pth layout
    loaded = load_point_encoder(tmp_path / "best_model.pth", k=4)
    assert loaded.source == "crosspoint"
    assert loaded.kwargs["emb_dims"] == 16  # read off the weight shapes
    assert loaded.kwargs["proj_dim"] == 8
    points = torch.randn(2, 32, 3)
    torch.testing.assert_close(features(loaded.encoder, points), features(model.point_q, points))
    torch.save({"model_state_dict": q}, tmp_path / "crosspoint.pth")
    assert load_point_encoder(tmp_path / "crosspoint.pth", k=4).kwargs["head_hidden"] == 16


def test_mismatched_checkpoint_lists_the_keys(
    checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    _, model = checkpoint
    state = dict(model.point_q.state_dict())
    del state["conv3.0.weight"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=r"missing \(1\): conv3\.0\.weight") as err:
        load_point_encoder(tmp_path / "bad.pth", k=4)
    assert "unexpected (1): extra.weight" in str(err.value)
    torch.save({"not": "a model"}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not a state dict"):
        load_point_encoder(tmp_path / "junk.pth")


def test_an_encoder_trained_on_raw_clouds_is_evaluated_on_raw_clouds(tmp_path: Path) -> None:
    """``data.point_augment.normalize=false`` travels with the checkpoint and the export, and the random-init
    baseline of ``eval`` is fed the same way; by default clouds are normalised."""
    from crossmoco_ray.config import load_config
    from crossmoco_ray.evaluate.run import encoders
    from crossmoco_ray.train.builders import build_model, build_optimizer
    from crossmoco_ray.train.checkpoint import build_state, write_checkpoint

    from .conftest import TINY

    cfg = load_config("quickstart", overrides=[*TINY, "data.point_augment.normalize=false"])
    model = build_model(cfg)
    state = build_state(model, build_optimizer(cfg, model), cfg, epoch=1, step=1, lr=1e-3)
    path = write_checkpoint(tmp_path / "ckpt", state, cfg)
    assert load_point_encoder(path).normalize is False
    assert load_point_encoder(export_backbone(path, tmp_path / "export")).normalize is False
    assert [enc.normalize for _, enc in encoders(str(path), baseline=True)] == [False, False]
    assert all(enc.normalize for _, enc in encoders(None, baseline=True, k=4, emb_dims=16))
