"""Plots are written and not blank; the monitor reports val_svm_acc and leaves the encoder as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from crossmoco_ray.data.readers import SyntheticSource
from crossmoco_ray.data.render import RenderSpec
from crossmoco_ray.data.shards import PrepareOptions, prepare
from crossmoco_ray.evaluate.monitor import SvmMonitor
from crossmoco_ray.evaluate.plots import confusion_plot, curves_plot, tsne_plot
from crossmoco_ray.nn import DGCNN


def not_blank(path: Path) -> bool:
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return img.shape[0] > 100 and img.std() > 5


def test_plots_are_written_and_not_blank(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 30)
    x = rng.normal(size=(120, 16)) + y[:, None] * 3
    assert not_blank(tsne_plot(x, y, ["a", "b", "c", "d"], tmp_path / "tsne.png"))
    assert not_blank(confusion_plot([[5, 1], [0, 6]], ["a", "b"], tmp_path / "cm.png"))
    curve = curves_plot({"loss": [(0, 3.0), (1, 2.0), (2, 1.5)]}, tmp_path / "curves.png")
    assert not_blank(curve)


def test_monitor_reports_val_svm_acc(tmp_path: Path) -> None:
    src = SyntheticSource({"train": 52, "test": 13}, num_points=64, seed=1)
    prepare(src, str(tmp_path / "shards"), PrepareOptions(val_fraction=0.3, render=RenderSpec(size=16)))
    monitor = SvmMonitor.from_source(str(tmp_path / "shards"), num_points=48, max_samples=30)
    assert len(monitor.train.labels) == 30  # bounded
    assert monitor.train.points.shape[1] == 48
    torch.manual_seed(0)
    encoder = DGCNN(k=4, emb_dims=16, head_hidden=16, proj_dim=8).train()
    out = monitor(encoder)
    assert 0.0 <= out["val_svm_acc"] <= 1.0
    assert out["val_svm_seconds"] > 0
    assert encoder.training  # restored
