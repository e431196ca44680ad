"""``crossmoco finetune cls`` on real Ray (CPU, 2 workers at 0.5 CPU): it learns from class-sorted files in
raw units, a relaunch resumes, and an error inside a worker reaches the user. (A run that dies mid-epoch
and ends bitwise where an uninterrupted one does: tests/finetune/test_worker.py on the shared skeleton,
whose restart under Ray with a killed worker tests/pretrain/test_pretrain_ray.py proves.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from crossmoco_ray.config.finetune import load_finetune_config
from crossmoco_ray.finetune.driver import finetune_cls, finetune_partseg
from tests.finetune.data import class_sorted_shapes_h5
from tests.helpers import RaiseAtStep

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TINY = [
    "model.k=8", "model.emb_dims=64", "data.num_points=128", "optim.optimizer=adamw", "optim.lr=0.003",
    "optim.min_lr=0.0001", "optim.weight_decay=0.0001", "train.batch_size=16", "train.num_workers=2",
    "train.cpus_per_worker=0.5", "train.epochs=5", "train.checkpoint_every_steps=4", "train.log_every=50",
    "train.max_failures=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    data = class_sorted_shapes_h5(tmp_path_factory.mktemp("h5"), n_train=240, n_test=60)
    storage = tmp_path_factory.mktemp("runs")
    cfg = load_finetune_config(overrides=TINY)
    out: dict[str, Any] = {"storage": storage, "data": data, "cfg": cfg}
    out["straight"] = finetune_cls(cfg, data=str(data), name="straight", storage_path=str(storage))
    return out


def test_it_learns_from_class_sorted_raw_unit_files(runs: dict[str, Any]) -> None:
    code, report = runs["straight"]
    assert code == 0
    s = report["summary"]
    assert s["final"]["oa"] >= 0.6, s  # 6 classes: chance is 1/6
    assert s["final"]["macc"] >= 0.55, s
    epochs = report["history"]["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert json.loads((runs["storage"] / "straight" / "report.json").read_text())["summary"] == s


def test_a_relaunch_of_a_finished_run_resumes_instead_of_starting_again(runs: dict[str, Any]) -> None:
    lines: list[str] = []
    code, report = finetune_cls(
        runs["cfg"],
        data=str(runs["data"]),
        name="straight",
        storage_path=str(runs["storage"]),
        log=lines.append,
    )
    assert code == 0
    assert report["summary"]["final"] == runs["straight"][1]["summary"]["final"]
    assert len(report["history"]["epochs"]) == 5  # nothing trained twice


def test_an_error_inside_a_worker_reaches_the_user(runs: dict[str, Any]) -> None:
    """A step callback that raises inside the workers: the run fails with that error's message (after
    train.max_failures=0 restarts), and the checkpoints stay."""
    cfg = load_finetune_config(overrides=[*TINY, "train.max_failures=0"])
    lines: list[str] = []
    code, _ = finetune_cls(
        cfg,
        data=str(runs["data"]),
        name="raises",
        storage_path=str(runs["storage"]),
        step_callbacks=[RaiseAtStep(6)],
        log=lines.append,
    )
    assert code == 1
    text = "\n".join(lines)
    assert "RuntimeError" in text
    assert "the callback refuses step 6" in text
    assert "relaunch the same command to resume" in text


def test_part_segmentation_learns_the_synthetic_parts(ray_session: None, tmp_path: Path) -> None:
    """DGCNN_partseg from random init on the built-in part set: instance mIoU well above predicting each
    category's most common part everywhere (and the same mIoU code the unit tests check by brute force)."""
    import numpy as np

    from crossmoco_ray.finetune.partseg import (
        load_part_split,
        miou,
        part_scheme,
        shape_ious,
        write_synthetic_parts,
    )

    data = write_synthetic_parts(tmp_path / "parts", n_train=160, n_test=40, points=256)
    cfg = load_finetune_config(
        "synthetic-parts",
        overrides=["data.num_points=256", "model.k=10", "model.emb_dims=128", "train.epochs=4",
                   "train.log_every=100"],
    )  # fmt: skip
    code, report = finetune_partseg(cfg, data=str(data), name="parts", storage_path=str(tmp_path / "runs"))
    assert code == 0
    scheme = part_scheme(data)
    train, test = load_part_split(data, "trainval", scheme), load_part_split(data, "test", scheme)
    majority = np.array([np.bincount(train.parts[train.category == c].ravel()).argmax() for c in range(4)])
    flat = np.repeat(majority[test.category][:, None], test.parts.shape[1], axis=1)
    baseline, _ = miou(shape_ious(flat, test.parts, test.category, scheme), test.category)
    final = report["summary"]["final"]
    assert final["ins_miou"] >= baseline + 0.15, (final, baseline)
    assert final["cls_miou"] > baseline
    assert report["task"] == "partseg"
