"""Part segmentation: CrossPoint's DGCNN_partseg layout, the mIoU against a brute-force count, ShapeNetPart's
h5 layout and its errors, the synthetic part set."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from crossmoco_ray.checkpoints.encoders import load_point_encoder
from crossmoco_ray.errors import DataError
from crossmoco_ray.finetune.partseg import (
    SHAPENET_PART,
    SYNTHETIC_PARTS,
    load_part_split,
    miou,
    part_scheme,
    shape_ious,
    write_synthetic_parts,
)
from crossmoco_ray.nn import DGCNNSeg, PartSegmenter

# DGCNN_partseg's parameters as CrossPoint's models/dgcnn.py names them (emb_dims 1024, 50 parts, 16
# categories); each bnN also appears inside its convN as convN.1 (the same module, two keys).
TRANSFORM = {
    "transform_net.conv1.0.weight": (64, 6, 1, 1), "transform_net.conv2.0.weight": (128, 64, 1, 1),
    "transform_net.conv3.0.weight": (1024, 128, 1), "transform_net.linear1.weight": (512, 1024),
    "transform_net.linear2.weight": (256, 512), "transform_net.transform.weight": (9, 256),
    "transform_net.transform.bias": (9,),
}  # fmt: skip
# BatchNorms: (name, width, the alias it also has inside a conv block, or None)
TRANSFORM_BN = [("transform_net.bn1", 64, "transform_net.conv1.1"),
                ("transform_net.bn2", 128, "transform_net.conv2.1"), ("transform_net.conv3.1", 1024, None),
                ("transform_net.bn3", 512, None), ("transform_net.bn4", 256, None)]  # fmt: skip
ENCODER = {
    "conv1.0.weight": (64, 6, 1, 1), "conv2.0.weight": (64, 64, 1, 1), "conv3.0.weight": (64, 128, 1, 1),
    "conv4.0.weight": (64, 64, 1, 1), "conv5.0.weight": (64, 128, 1, 1), "conv6.0.weight": (1024, 192, 1),
}  # fmt: skip
ENCODER_BN = [(f"bn{i}", 64, f"conv{i}.1") for i in range(1, 6)] + [("bn6", 1024, "conv6.1")]
HEAD = {
    "conv7.0.weight": (64, 16, 1), "conv8.0.weight": (256, 1280, 1), "conv9.0.weight": (256, 256, 1),
    "conv10.0.weight": (128, 256, 1), "conv11.weight": (50, 128, 1),
}  # fmt: skip
HEAD_BN = [
    ("bn7", 64, "conv7.1"),
    ("bn8", 256, "conv8.1"),
    ("bn9", 256, "conv9.1"),
    ("bn10", 128, "conv10.1"),
]
INV_HEAD = {"inv_head.0.weight": (1024, 1024), "inv_head.0.bias": (1024,), "inv_head.3.weight": (256, 1024),
            "inv_head.3.bias": (256,)}  # fmt: skip
INV_HEAD_BN = [("inv_head.1", 1024, None)]


def _bn(name: str, c: int) -> dict[str, torch.Tensor]:
    stats = {"weight": torch.rand(c), "bias": torch.rand(c), "running_mean": torch.rand(c),
             "running_var": torch.rand(c) + 0.5, "num_batches_tracked": torch.tensor(7)}  # fmt: skip
    return {f"{name}.{k}": v for k, v in stats.items()}


def crosspoint_state(with_head: bool, with_inv_head: bool) -> dict[str, torch.Tensor]:
    shapes = TRANSFORM | ENCODER | (HEAD if with_head else {}) | (INV_HEAD if with_inv_head else {})
    state = {k: torch.randn(v) for k, v in shapes.items()}
    bns = TRANSFORM_BN + ENCODER_BN + (HEAD_BN if with_head else []) + (INV_HEAD_BN if with_inv_head else [])
    for name, width, alias in bns:
        values = _bn(name, width)
        state |= values
        if alias is not None:  # the same module under its second name: the same tensors
            state |= {k.replace(name, alias, 1): v for k, v in values.items()}
    return state


def test_a_fine_tuned_crosspoint_dgcnn_partseg_state_dict_loads_strictly() -> None:
    model = PartSegmenter(DGCNNSeg(k=40))
    state = {k: v for k, v in crosspoint_state(True, False).items()}
    own = model.state_dict()
    assert set(own) == set(state), sorted(set(own) ^ set(state))
    for key, value in state.items():
        assert tuple(own[key].shape) == tuple(value.shape), key
    model.load_state_dict(state, strict=True)


def test_a_pretrained_dgcnn_seg_file_loads_as_an_encoder(tmp_path: Path) -> None:
    encoder = DGCNNSeg(k=40)
    pretrained = crosspoint_state(False, True)
    assert set(encoder.state_dict()) == set(pretrained)
    path = tmp_path / "dgcnn_partseg_best.pth"
    torch.save({f"module.{k}": v for k, v in encoder.state_dict().items()}, path)
    loaded = load_point_encoder(path, k=40)
    assert loaded.name == "dgcnn_seg"
    assert loaded.kwargs["emb_dims"] == 1024
    for key, value in encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value), key
    x = torch.randn(2, 64, 3)
    assert loaded.encoder.eval().forward_features(x).shape == (2, 1024)
    # a fine-tuned file (segmentation head, no projection head) gives its encoder too
    tuned = PartSegmenter(DGCNNSeg(k=40))
    torch.save(tuned.state_dict(), tmp_path / "model.t7")
    assert load_point_encoder(tmp_path / "model.t7", k=40).name == "dgcnn_seg"


def test_segmenter_output_and_the_transform_starts_as_the_identity() -> None:
    torch.manual_seed(0)
    enc = DGCNNSeg(k=8, emb_dims=64)
    x = torch.randn(3, 100, 3)
    edges_identity = enc.transform_net.transform.bias.view(3, 3)
    assert torch.equal(edges_identity, torch.eye(3))
    model = PartSegmenter(enc, num_parts=10, num_categories=4).eval()
    assert model(x, torch.tensor([0, 1, 3])).shape == (3, 10, 100)


def brute_force_miou(pred: np.ndarray, parts: np.ndarray, category: np.ndarray, counts: list[int]):
    """Sets of point indices per part, part by part, shape by shape."""
    starts = np.cumsum([0, *counts])
    shape_scores, by_cat = [], {}
    for i in range(len(category)):
        c = int(category[i])
        ious = []
        for p in range(int(starts[c]), int(starts[c + 1])):
            a = {j for j, v in enumerate(pred[i].tolist()) if v == p}
            b = {j for j, v in enumerate(parts[i].tolist()) if v == p}
            ious.append(1.0 if not (a | b) else len(a & b) / len(a | b))
        shape_scores.append(sum(ious) / len(ious))
        by_cat.setdefault(c, []).append(shape_scores[-1])
    return sum(shape_scores) / len(shape_scores), sum(sum(v) / len(v) for v in by_cat.values()) / len(by_cat)


def test_miou_matches_a_brute_force_count_on_random_predictions() -> None:
    rng = np.random.default_rng(0)
    counts = list(SHAPENET_PART.part_counts)
    starts = np.cumsum([0, *counts])
    category = rng.integers(0, 16, 60)
    parts = np.stack([rng.integers(starts[c], starts[c + 1], 40) for c in category])
    pred = np.where(
        rng.random((60, 40)) < 0.5, parts, rng.integers(0, 50, (60, 40))
    )  # some outside the category
    pred[0] = parts[0]  # a perfect shape
    pred[1] = 49 if category[1] != 15 else 0  # a shape with nothing right
    ins, cls = miou(shape_ious(pred, parts, category, SHAPENET_PART), category)
    b_ins, b_cls = brute_force_miou(pred, parts, category, counts)
    assert ins == pytest.approx(b_ins, abs=1e-12)
    assert cls == pytest.approx(b_cls, abs=1e-12)
    assert shape_ious(pred[:1], parts[:1], category[:1], SHAPENET_PART)[0] == 1.0


def test_shapenetpart_layout_reads_trainval_and_names_bad_files(tmp_path: Path) -> None:
    root = tmp_path / "shapenet_part_seg_hdf5_data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n, cat in (
        ("ply_data_train0.h5", 6, 0),
        ("ply_data_val0.h5", 2, 4),
        ("ply_data_test0.h5", 3, 15),
    ):
        with h5py.File(root / name, "w") as f:
            f["data"] = rng.normal(size=(n, 32, 3)).astype(np.float32)
            f["label"] = np.full((n, 1), cat, np.uint8)
            start = sum(SHAPENET_PART.part_counts[:cat])
            f["pid"] = rng.integers(start, start + SHAPENET_PART.part_counts[cat], (n, 32)).astype(np.uint8)
    assert part_scheme(root) is SHAPENET_PART
    trainval = load_part_split(root, "trainval", SHAPENET_PART)
    assert len(trainval.category) == 8
    assert sorted(set(trainval.category.tolist())) == [0, 4]
    assert len(load_part_split(root, "test", SHAPENET_PART).category) == 3
    with h5py.File(root / "ply_data_test0.h5", "r+") as f:
        f["pid"][0, 0] = 0  # airplane's part on a table
    with pytest.raises(DataError, match=r"ply_data_test0|outside their category"):
        load_part_split(root, "test", SHAPENET_PART)
    with h5py.File(root / "ply_data_test1.h5", "w") as f:
        f["data"] = np.zeros((1, 32, 3), np.float32)
    with pytest.raises(DataError, match=r"ply_data_test1.h5.*missing datasets \['label', 'pid'\]"):
        load_part_split(root, "test", SHAPENET_PART)


def test_the_synthetic_part_set(tmp_path: Path) -> None:
    root = write_synthetic_parts(tmp_path / "parts", n_train=16, n_test=8, points=128)
    scheme = part_scheme(root)
    assert scheme == SYNTHETIC_PARTS
    train = load_part_split(root, "trainval", scheme)  # checked: every part id in its category's range
    assert train.points.shape == (16, 128, 3)
    assert np.bincount(train.category).tolist() == [4, 4, 4, 4]
    radius = np.linalg.norm(train.points, axis=2).max(axis=1)
    assert np.allclose(radius, 1.0, atol=1e-5)
    for i in range(16):  # every part of the shape's category is drawn on
        assert set(train.parts[i].tolist()) == set(scheme.parts_of(int(train.category[i])).tolist())
    again = write_synthetic_parts(tmp_path / "again", n_train=16, n_test=8, points=128)
    assert np.array_equal(load_part_split(again, "trainval", scheme).points, train.points)  # seeded


def test_dgcnn_seg_pretrains_in_crossmoco_and_its_checkpoint_loads_for_segmentation(tmp_path: Path) -> None:
    """``model.point_encoder=dgcnn_seg``: a CrossMoCo step trains it (the loss is finite and its weights
    move), and the checkpoint's encoder is what `finetune partseg` starts from."""
    from crossmoco_ray.architecture import build_model
    from crossmoco_ray.checkpoints.state import build_state, write_checkpoint
    from crossmoco_ray.config.finetune import load_finetune_config
    from crossmoco_ray.config.loading import load_config
    from crossmoco_ray.finetune.driver import encoder_payload, load_encoder
    from crossmoco_ray.finetune.worker import build_segmenter
    from crossmoco_ray.pretrain.optim import build_optimizer
    from crossmoco_ray.pretrain.step import train_step
    from tests.helpers import tiny_batch

    cfg = load_config(
        "quickstart",
        overrides=["model.point_encoder=dgcnn_seg", "model.k=4", "model.emb_dims=32", "model.proj_dim=8",
                   "model.point_head_hidden=16", "model.image_encoder=resnet18", "model.image_head_hidden=16",
                   "data.num_points=24", "objective.queue_length=16", "train.batch_size=4"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model.point_q, DGCNNSeg)
    before = model.point_q.conv6[0].weight.detach().clone()
    opt = build_optimizer(cfg, model)
    out = train_step(model, tiny_batch(4, points=24), opt, 0.99)
    assert torch.isfinite(out["loss"])
    assert not torch.equal(before, model.point_q.conv6[0].weight)
    state = build_state(model, opt, cfg, epoch=1, step=1, lr=1e-3)
    write_checkpoint(tmp_path / "ckpt", state, cfg)
    ft = load_finetune_config("synthetic-parts")
    loaded = load_encoder(ft, str(tmp_path / "ckpt"), "partseg")
    assert loaded.name == "dgcnn_seg"
    seg = build_segmenter(encoder_payload(loaded), ft, num_parts=10, num_categories=4)
    assert torch.equal(seg.conv6[0].weight, model.point_q.conv6[0].weight)
    plain = load_config("quickstart", overrides=["model.k=4", "model.emb_dims=32", "data.num_points=24"])
    plain_model = build_model(plain)
    plain_state = build_state(
        plain_model, build_optimizer(plain, plain_model), plain, epoch=1, step=1, lr=0.1
    )
    write_checkpoint(tmp_path / "plain", plain_state, plain)
    with pytest.raises(ValueError, match=r"model.point_encoder=dgcnn_seg"):
        load_encoder(ft, str(tmp_path / "plain"), "partseg")


def test_under_bf16_autocast_the_transformed_coordinates_stay_fp32() -> None:
    """The spatial transform's output chooses conv1's neighbours and is its edge features: not rounded to
    bf16 under autocast."""
    from crossmoco_ray.nn.dgcnn_seg import DGCNNSeg

    torch.manual_seed(0)
    encoder = DGCNNSeg(k=8, emb_dims=32, proj_dim=8, head_hidden=16).train()
    seen: list[torch.dtype] = []
    encoder.conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    points = torch.randn(3, 40, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoder(points)
    assert seen == [torch.float32]  # conv1's edge features (autocast casts them inside the conv)
