"""Fine-tuning's maths and plumbing without Ray: loss, metrics, batches, augmentations, the classifier,
the frozen mode, the configuration and the command line."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmoco_ray.cli.main import main, parse_command
from crossmoco_ray.config.finetune import finetune_preset_names, load_finetune_config
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.finetune.driver import encoder_payload, load_data, load_encoder, summarize
from crossmoco_ray.finetune.model import PointClassifier, accuracies, classifier_head, smoothed_cross_entropy
from crossmoco_ray.finetune.worker import (
    augment_batch,
    build_classifier,
    build_optimizer,
    global_batch_indices,
    lr_at,
)
from crossmoco_ray.nn import DGCNN
from tests.finetune.data import class_sorted_shapes_h5


def test_smoothed_loss_is_dgcnns_cal_loss() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    eps = 0.2
    logp = torch.log_softmax(logits, 1)
    expected = 0.0
    for i, y in enumerate(labels.tolist()):  # (1 - ε) on the label, ε / (C - 1) on each other class
        expected -= sum(((1 - eps) if c == y else eps / 4) * logp[i, c] for c in range(5)) / 7
    assert torch.allclose(smoothed_cross_entropy(logits, labels, eps), torch.as_tensor(expected), atol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(smoothed_cross_entropy(logits, labels, 0.0), plain)


def test_accuracies_match_a_count_by_hand() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, 500)
    pred = np.where(rng.random(500) < 0.6, labels, rng.integers(0, 6, 500))
    oa, macc = accuracies(pred, labels, 8)  # classes 6 and 7 absent from labels: not averaged
    pairs = list(zip(pred.tolist(), labels.tolist(), strict=True))
    assert oa == pytest.approx(sum(int(p == y) for p, y in pairs) / 500)
    per = [sum(1 for p, y in pairs if y == c and p == c) / sum(labels == c) for c in range(6)]
    assert macc == pytest.approx(sum(per) / 6)


def test_global_batches_split_over_workers_cover_an_epoch_once() -> None:
    n, batch, world = 103, 16, 2
    seen = []
    for step in range(n // batch):
        rows = global_batch_indices(n, batch, seed=3, epoch=1, step=step)
        parts = [rows[r * (batch // world) : (r + 1) * (batch // world)] for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(rows.tolist())  # workers = one process
        seen += rows.tolist()
    assert len(seen) == len(set(seen)) == (n // batch) * batch  # drop-last, no row twice
    other = global_batch_indices(n, batch, seed=3, epoch=2, step=0)
    assert not np.array_equal(other, global_batch_indices(n, batch, seed=3, epoch=1, step=0))


def test_augment_is_seeded_subsampled_normalised_and_bounded() -> None:
    cfg = load_finetune_config(overrides=["data.num_points=32"])
    rng = np.random.default_rng(0)
    raw = (1000.0 * rng.normal(size=(4, 64, 3)) + 5e4).astype(np.float32)  # millimetres, far from 0
    a, order = augment_batch(raw, cfg, True, np.random.default_rng([1, 2]))
    b, _ = augment_batch(raw, cfg, True, np.random.default_rng([1, 2]))
    assert order.shape == (4, 32)
    assert all(len(set(row.tolist())) == 32 for row in order)  # a subset, no point twice
    assert a.shape == (4, 32, 3)
    assert torch.equal(a, b)
    # unit sphere × scale ≤ 1.5 + shift ≤ 0.2 per axis
    assert float(a.abs().max()) <= 1.5 + 0.2 + 1e-5
    assert not torch.equal(a, augment_batch(raw, cfg, True, np.random.default_rng([1, 3]))[0])


def test_cosine_schedule_runs_from_lr_to_min_lr() -> None:
    cfg = load_finetune_config(overrides=["optim.warmup_epochs=1"])
    spe, total = 10, 100
    assert lr_at(cfg, 0, total, spe) == pytest.approx(0.1 / 10)  # warm-up
    assert lr_at(cfg, 10, total, spe) == pytest.approx(0.1)
    assert lr_at(cfg, total, total, spe) == pytest.approx(1e-3)
    values = [lr_at(cfg, s, total, spe) for s in range(10, total + 1)]
    assert all(x >= y for x, y in itertools.pairwise(values))


def test_a_pretrained_encoder_enters_the_classifier_with_its_weights(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = DGCNN(k=4, emb_dims=32, proj_dim=8, head_hidden=16)
    path = tmp_path / "crosspoint.pth"
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in encoder.state_dict().items()}}, path)
    cfg = load_finetune_config(overrides=["model.k=4"])
    loaded = load_encoder(cfg, str(path))
    assert loaded.source == "crosspoint"
    assert loaded.kwargs["k"] == 4
    model = build_classifier(encoder_payload(loaded), cfg, num_classes=5)
    for key, value in encoder.state_dict().items():
        if not key.startswith("inv_head."):
            assert torch.equal(model.encoder.state_dict()[key], value), key
    assert not any(k.startswith("encoder.inv_head.") for k in model.state_dict())  # unused: not trained
    x = torch.randn(3, 24, 3)
    assert model.eval()(x).shape == (3, 5)
    bad = encoder_payload(loaded) | {"kwargs": {**loaded.kwargs, "emb_dims": 64}}
    with pytest.raises(ValueError, match=r"shape mismatch"):
        build_classifier(bad, cfg, 5)


def test_frozen_backbone_trains_the_head_only_and_keeps_bn_statistics() -> None:
    torch.manual_seed(0)
    cfg = load_finetune_config(overrides=["train.freeze_backbone=true", "model.head=linear"])
    encoder = DGCNN(k=4, emb_dims=16)
    model = PointClassifier(encoder, classifier_head(32, 3, "linear"), frozen=True)
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    opt = build_optimizer(cfg, model)
    assert len(opt.param_groups) == 1  # the head's
    model.train()
    assert not model.encoder.training
    for _ in range(3):
        loss = smoothed_cross_entropy(model(torch.randn(4, 20, 3)), torch.tensor([0, 1, 2, 0]), 0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for key, value in model.encoder.state_dict().items():  # weights and running statistics
        assert torch.equal(value, before[key]), key


def test_load_data_checks_points_and_carves_a_seeded_val_split(tmp_path: Path) -> None:
    root = class_sorted_shapes_h5(tmp_path / "h5", n_train=60, n_test=30, points=64)
    cfg = load_finetune_config(overrides=["data.num_points=64", "data.val_fraction=0.2"])
    splits = load_data(cfg, str(root))
    assert [len(splits[k].labels) for k in ("train", "val", "test")] == [48, 12, 30]
    again = load_data(cfg, str(root))
    assert np.array_equal(splits["val"].labels, again["val"].labels)
    with pytest.raises(ConfigError, match=r"data.num_points=64 or less"):
        load_data(load_finetune_config(overrides=["data.num_points=65"]), str(root))
    with pytest.raises(ConfigError, match=r"lower train.batch_size"):
        load_data(load_finetune_config(overrides=["data.num_points=64", "train.batch_size=64"]), str(root))


def test_summary_keeps_the_honest_number_apart_from_the_papers_choice() -> None:
    history = {
        "epochs": [
            {"epoch": 1, "test_oa": 0.5, "test_macc": 0.4, "val_oa": 0.6},
            {"epoch": 2, "test_oa": 0.8, "test_macc": 0.7, "val_oa": 0.5},
            {"epoch": 3, "test_oa": 0.7, "test_macc": 0.6, "val_oa": 0.7},
        ]
    }
    s = summarize(history)
    assert s["final"]["oa"] == 0.7
    assert s["first"]["oa"] == 0.5
    assert s["best_test"] == {"epoch": 2, "oa": 0.8, "macc": 0.7}
    assert s["val_chosen"]["epoch"] == 3


def test_configuration_presets_overrides_and_their_errors() -> None:
    assert {"dgcnn", "modelnet40-cpu"} <= set(finetune_preset_names())
    cfg = load_finetune_config("modelnet40-cpu", overrides=["optim.lr=0.05"])
    assert (cfg.train.num_workers, cfg.optim.lr, cfg.per_worker_batch) == (2, 0.05, 16)
    with pytest.raises(ConfigError, match=r"did you mean 'optim.lr'.*finetune cls --show-config"):
        load_finetune_config(overrides=["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"train.batch_size=32 or 34"):
        load_finetune_config(overrides=["train.batch_size=33", "train.num_workers=2"])
    with pytest.raises(ConfigError, match=r"unknown fine-tuning preset"):
        load_finetune_config("paper")


def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    parsed = parse_command(["finetune", "cls", "--data", "x", "optim.lr=0.01"])
    assert parsed.form == "finetune cls"
    assert parsed.args.finetune_config.optim.lr == 0.01
    with pytest.raises(ConfigError, match=r"optim.lr"):
        parse_command(["finetune", "cls", "--data", "x", "optim.lr=-1"])
    assert main(["finetune", "cls", "--show-config", "--preset", "modelnet40-cpu"]) == 0
    assert "num_points: 512" in capsys.readouterr().out
    assert main(["finetune", "cls"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert main(["finetune", "cls", "--data", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
