"""Fixtures of the checkpoint and evaluation tests: a real crossmoco-ray checkpoint of a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from crossmoco_ray.architecture import build_model
from crossmoco_ray.checkpoints.state import build_state, write_checkpoint
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.pretrain.optim import build_optimizer

TINY = [
    "model.k=4", "model.emb_dims=16", "model.point_head_hidden=16", "model.proj_dim=8",
    "model.image_encoder=resnet18", "model.image_head_hidden=8", "data.num_points=32",
    "objective.queue_length=32", "train.batch_size=4", "train.num_workers=1",
]  # fmt: skip


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    cfg = load_config("quickstart", overrides=TINY)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # make the online and key encoders differ, so the test sees which one loads
        for p in model.point_q.parameters():
            p.mul_(1.05).add_(0.01)
    state = build_state(
        model, build_optimizer(cfg, model), cfg, epoch=3, step=30, lr=1e-3, mlflow_run_id="abc"
    )
    return write_checkpoint(tmp_path / "ckpt", state, cfg), model
