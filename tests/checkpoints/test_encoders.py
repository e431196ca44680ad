"""Export → import round trip; CrossPoint / CrossMoCo formats; mismatches name the keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crossmoco_ray.checkpoints.encoders import export_backbone, load_point_encoder


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
    from crossmoco_ray.architecture import build_model
    from crossmoco_ray.checkpoints.state import build_state, write_checkpoint
    from crossmoco_ray.config.loading import load_config
    from crossmoco_ray.evaluate.protocols import encoders
    from crossmoco_ray.pretrain.optim import build_optimizer

    from .conftest import TINY

    cfg = load_config("quickstart", overrides=[*TINY, "data.point_augment.normalize=false"])
    model = build_model(cfg)
    state = build_state(model, build_optimizer(cfg, model), cfg, epoch=1, step=1, lr=1e-3)
    path = write_checkpoint(tmp_path / "ckpt", state, cfg)
    assert load_point_encoder(path).normalize is False
    assert load_point_encoder(export_backbone(path, tmp_path / "export")).normalize is False
    assert [enc.normalize for _, enc in encoders(str(path), baseline=True)] == [False, False]
    assert all(enc.normalize for _, enc in encoders(None, baseline=True, k=4, emb_dims=16))


# --------------------------------------------------------------------------------------------------
# Damaged or crafted files: a ValueError (or ConfigError) naming the file, before anything is allocated
# --------------------------------------------------------------------------------------------------


def checkpoint_state(path: Path) -> dict:
    return torch.load(path / "state.pt", weights_only=True)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        ({"config": ["not", "a", "mapping"]}, "'config' is a list, not a mapping"),
        ({"model": "weights"}, "'model' is a str, not a mapping"),
        ({"version": torch.tensor([1, 2])}, "checkpoint version <Tensor>"),
        ({"model": {"point_q.conv1.weight": [1.0, 2.0]}}, "point_q.conv1.weight is a list, not a tensor"),
    ],
    ids=["config", "model", "version", "weight"],
)
def test_a_damaged_checkpoint_is_a_named_error_for_eval_and_export(
    damage: dict, named: str, checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = checkpoint
    state = checkpoint_state(path) | damage
    torch.save(state, tmp_path / "damaged.pt")
    for read in (load_point_encoder, lambda p: export_backbone(p, tmp_path / "export")):
        with pytest.raises(ValueError, match=r"damaged\.pt") as err:
            read(tmp_path / "damaged.pt")
        assert named in str(err.value)


@pytest.mark.timeout(20)
def test_a_crafted_tensor_claiming_a_huge_shape_is_refused_before_the_encoder_is_built(
    tmp_path: Path,
) -> None:
    """One stored float, stride 0, shape [2**40, 512, 1]: the DGCNN width read off it would be allocated."""
    torch.save({"conv5.0.weight": torch.zeros(1).expand(2**40, 512, 1)}, tmp_path / "crafted.pth")
    assert (tmp_path / "crafted.pth").stat().st_size < 4000
    with pytest.raises(ValueError, match=r"crafted\.pth: the state dict's conv5\.0\.weight claims shape"):
        load_point_encoder(tmp_path / "crafted.pth")


def test_a_stored_architecture_that_the_weights_do_not_have_is_refused_before_it_is_built(
    checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    """A stored config asking for a width the checkpoint's weights do not have is matched on the meta
    device: the mismatch is named, and nothing of that width is allocated."""
    path, _ = checkpoint
    state = checkpoint_state(path)
    state["config"]["model"]["emb_dims"] = 2**40
    torch.save(state, tmp_path / "wide.pt")
    with pytest.raises(ValueError, match=r"shape mismatch .*conv5\.0\.weight"):
        load_point_encoder(tmp_path / "wide.pt")


EXPORT_DAMAGE = [
    ({"kwargs": {"emb_dims": "wide"}}, "the export's kwargs hold 'emb_dims'='wide'"),
    ({"kwargs": {"bogus": 1}}, "cannot build a dgcnn encoder from {'bogus': 1}"),
    ({"architecture": "transformer"}, "the export's architecture 'transformer' is none of"),
    ({"point_encoder": None}, "the exported point encoder is a NoneType"),
]


def test_a_damaged_export_or_meta_json_is_a_named_error(
    checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = checkpoint
    out = export_backbone(path, tmp_path / "export")
    good = torch.load(out / "backbone.pt", weights_only=True)
    for damage, named in EXPORT_DAMAGE:
        torch.save(good | damage, out / "backbone.pt")
        with pytest.raises(ValueError, match=r"backbone\.pt") as err:
            load_point_encoder(out)
        assert named in str(err.value)
    torch.save(good, out / "backbone.pt")
    for meta in (b"{not json", b"[1, 2]", b"[" * 100_000, b" " * (2 << 20)):
        (out / "meta.json").write_bytes(meta)
        with pytest.raises(ValueError, match=r"meta\.json") as err:
            load_point_encoder(out)
        assert len(str(err.value)) < 400


def test_export_refuses_a_checkpoint_without_the_encoders_weights(
    checkpoint: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    path, _ = checkpoint
    state = checkpoint_state(path)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("point_q.")}
    torch.save(state, tmp_path / "no_encoder.pt")
    with pytest.raises(ValueError, match=r"no_encoder\.pt \(its point encoder\) does not match DGCNN"):
        export_backbone(tmp_path / "no_encoder.pt", tmp_path / "export")
    assert not (tmp_path / "export" / "backbone.pt").exists()


def rezip(src: Path, dst: Path, compression: int) -> None:
    """``src`` (a torch.save archive) rewritten with every entry compressed as ``compression``."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


@pytest.mark.timeout(20)
def test_a_compressed_archive_claiming_a_large_tensor_is_refused_before_it_is_loaded(tmp_path: Path) -> None:
    import tracemalloc
    import zipfile

    torch.save({"model": {"w": torch.zeros(25_000_000)}}, tmp_path / "big.pt")  # 100 MB of zeros
    rezip(tmp_path / "big.pt", tmp_path / "bomb.pt", zipfile.ZIP_DEFLATED)
    (tmp_path / "big.pt").unlink()
    assert (tmp_path / "bomb.pt").stat().st_size < 1_000_000
    tracemalloc.start()
    try:
        for read in (load_point_encoder, lambda p: export_backbone(p, tmp_path / "export")):
            with pytest.raises(ValueError, match=r"bomb\.pt: entry .* is compressed"):
                read(tmp_path / "bomb.pt")
        assert tracemalloc.get_traced_memory()[1] < 20_000_000
    finally:
        tracemalloc.stop()


@pytest.mark.timeout(20)
def test_a_fifo_or_device_as_a_checkpoint_is_refused_without_blocking(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo.pt")
    os.symlink("/dev/zero", tmp_path / "zero.pt")
    for name in ("fifo.pt", "zero.pt"):
        for read in (load_point_encoder, lambda p: export_backbone(p, tmp_path / "export")):
            with pytest.raises(ValueError, match=rf"{name}: not a regular file"):
                read(tmp_path / name)
