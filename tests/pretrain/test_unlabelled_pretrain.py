"""A corpus without labels pretrains: shards that are all label −1 turn the monitor and the final evaluation
off with one line saying to set ``eval.data``; with ``eval.data`` the monitor reads it. The corpus here is a
list of GLB files prepared with ``--store meshes``: its views are rendered in the Ray Data pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trimesh

from crossmoco_ray.cli.main import main
from crossmoco_ray.config.loading import load_config
from crossmoco_ray.data.shards.manifest import read_manifest
from crossmoco_ray.pretrain.data_checks import label_evaluation_note, unlabelled
from crossmoco_ray.pretrain.driver import EXIT_OK, pretrain
from crossmoco_ray.pretrain.launch import monitor_spec
from crossmoco_ray.pretrain.resolve import Run

TINY = [
    "model.k=4", "model.emb_dims=32", "model.point_head_hidden=32", "model.proj_dim=16",
    "model.image_encoder=resnet18", "model.image_head_hidden=16",
    "data.num_points=64", "data.image_size=32", "data.read_batch=16",
    "objective.queue_length=16", "train.batch_size=8", "train.log_every=1", "train.epochs=1",
    "eval.num_points=64", "eval.monitor_samples=40", "tracking.log_model=false", "eval.final=true",
]  # fmt: skip


def glb_list_corpus(tmp_path: Path, n: int = 20) -> Path:
    """``n`` GLB scenes (a box and a cylinder, placed by their nodes) named by a list file, prepared
    unlabelled with a val split: the shards' directory."""
    folder = tmp_path / "objaverse"
    lines = []
    for i in range(n):
        scene = trimesh.Scene()
        scene.add_geometry(trimesh.creation.box(extents=(1.0, 0.2 + 0.1 * (i % 5), 0.5)))
        move = trimesh.transformations.translation_matrix([0.0, 0.3 * (i % 3), 0.0])
        scene.add_geometry(trimesh.creation.cylinder(radius=0.2, height=1.0, sections=8), transform=move)
        (folder / f"{i:03d}").mkdir(parents=True)
        (folder / f"{i:03d}" / f"{i:032x}.glb").write_bytes(scene.export(file_type="glb"))
        lines.append(f"{i:03d}/{i:032x}.glb")
    (folder / "files.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    args = [
        "prepare",
        str(folder / "files.txt"),
        "--out",
        str(out),
        "--num-points",
        "64",
        "--store",
        "meshes",
    ]
    assert main([*args, "--val-fraction", "0.2"]) == 0
    return out


def test_unlabelled_shards_turn_the_monitor_off_unless_eval_data_is_set(tmp_path: Path) -> None:
    manifest: dict[str, Any] = {
        "class_names": None,
        "num_points": 64,
        "counts": {
            "train": {"total": 9, "per_class": {"-1": 9}},
            "val": {"total": 2, "per_class": {"-1": 2}},
        },
    }
    assert unlabelled(manifest)
    cfg = load_config("quickstart", overrides=TINY)
    run = Run(cfg, "r", str(tmp_path), "data/corpus", manifest, 1)
    assert monitor_spec(run) is None
    note = label_evaluation_note(cfg, manifest, "data/corpus")
    assert note is not None
    assert "set eval.data" in note
    assert "the final evaluation are off" in note
    with_eval = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"data": "data/mn40"})})
    spec = monitor_spec(Run(with_eval, "r", str(tmp_path), "data/corpus", manifest, 1))
    assert spec is not None
    assert spec.root == "data/mn40"
    assert label_evaluation_note(with_eval, manifest, "data/corpus") is None
    labelled = {**manifest, "class_names": ["a"], "counts": {"train": {"total": 9, "per_class": {"a": 9}}}}
    assert not unlabelled(labelled)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.usefixtures("ray_session")
def test_a_glb_list_corpus_pretrains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = glb_list_corpus(tmp_path)
    manifest = read_manifest(str(shards))
    assert unlabelled(manifest)
    assert manifest["meshes"] is True
    assert manifest["views_per_object"] == 0  # no renders stored: the pipeline renders them
    cfg = load_config("quickstart", overrides=[*TINY, f"data.source={shards}", "data.render.size=32"])
    lines: list[str] = []
    code, summary = pretrain(cfg, name="corpus", storage=str(tmp_path / "runs"), log=lines.append)
    assert code == EXIT_OK, lines
    assert summary["metrics"]["epoch"] == 1
    said = "\n".join(lines)
    assert said.count("is unlabelled: the monitor and the final evaluation are off") == 1
    assert "set eval.data to a labelled set" in said
    assert "final linear SVM" not in said + capsys.readouterr().out  # eval.final is on, but nothing to score
