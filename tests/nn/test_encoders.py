"""Encoders: DGCNN's invariances and compatibility with CrossPoint checkpoints, PointNet, ResNet trunks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision

from crossmoco_ray.nn import DGCNN, ImageEncoder, PointNet, build_point_encoder, load_checked, strip_prefixes

# CrossPoint's DGCNN state dict (METHOD.md §1.1a): (key, shape) at emb_dims=1024, output 256.
CONVS = {
    "conv1": (64, 6, 1, 1),
    "conv2": (64, 128, 1, 1),
    "conv3": (128, 128, 1, 1),
    "conv4": (256, 256, 1, 1),
}
BN_WIDTHS = {1: 64, 2: 64, 3: 128, 4: 256, 5: 1024}


def crosspoint_state_dict(prefix: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {f"{name}.0.weight": shape for name, shape in CONVS.items()}
    shapes["conv5.0.weight"] = (1024, 512, 1)
    for i, width in BN_WIDTHS.items():
        for owner in (f"bn{i}", f"conv{i}.1"):  # each BatchNorm is registered twice
            for p in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"{owner}.{p}"] = (width,)
            shapes[f"{owner}.num_batches_tracked"] = ()
    shapes.update({
        "inv_head.0.weight": (1024, 2048), "inv_head.0.bias": (1024,),
        "inv_head.1.weight": (1024,), "inv_head.1.bias": (1024,),
        "inv_head.1.running_mean": (1024,), "inv_head.1.running_var": (1024,),
        "inv_head.1.num_batches_tracked": (),
        "inv_head.3.weight": (256, 1024), "inv_head.3.bias": (256,),
    })  # fmt: skip
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        else:
            state[key] = torch.rand(shape, generator=g) + 0.1
    for i in BN_WIDTHS:  # the two names of one BatchNorm hold the same values in a saved file
        for p in ("weight", "bias", "running_mean", "running_var"):
            state[f"conv{i}.1.{p}"] = state[f"bn{i}.{p}"]
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("prefix", ["", "module.", "point_model_q.", "module.point_model_q."])
def test_crosspoint_state_dict_loads_strict(prefix: str) -> None:
    state = strip_prefixes(crosspoint_state_dict(prefix))
    model = DGCNN(k=15, emb_dims=1024)
    model.load_state_dict(state, strict=True)
    assert torch.equal(model.conv4[0].weight, state["conv4.0.weight"])
    assert torch.equal(model.bn5.running_var, state["bn5.running_var"])
    assert model.bn3 is model.conv3[1]


def test_mismatched_checkpoint_lists_the_keys() -> None:
    state = strip_prefixes(crosspoint_state_dict("module."))
    del state["conv2.0.weight"]
    state["conv9.0.weight"] = torch.zeros(1)
    state["inv_head.3.weight"] = torch.zeros(128, 1024)
    with pytest.raises(ValueError, match=r"conv2\.0\.weight") as err:
        load_checked(DGCNN(), state, what="ckpt.pth")
    assert "conv9.0.weight" in str(err.value)
    assert "inv_head.3.weight: (128, 1024)" in str(err.value)


@pytest.mark.parametrize("edgeconv", ["fast", "reference"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_dgcnn_is_invariant_to_point_order(edgeconv: str, train: bool) -> None:
    torch.manual_seed(0)
    model = DGCNN(k=8, emb_dims=64, head_hidden=32, proj_dim=16, edgeconv=edgeconv).double().train(train)
    points = torch.randn(4, 100, 3, dtype=torch.float64)
    perm = torch.randperm(100)
    z, feat = model(points)
    z_perm, feat_perm = model(points[:, perm])
    assert feat.shape == (4, 128)
    assert z.shape == (4, 16)
    torch.testing.assert_close(feat_perm, feat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z_perm, z, rtol=1e-10, atol=1e-12)


def test_dgcnn_fast_equals_reference_end_to_end() -> None:
    torch.manual_seed(0)
    fast = DGCNN(k=10, emb_dims=64, head_hidden=32, proj_dim=16, edgeconv="fast").double()
    ref = DGCNN(k=10, emb_dims=64, head_hidden=32, proj_dim=16, edgeconv="reference").double()
    ref.load_state_dict(fast.state_dict())
    points = torch.randn(4, 128, 3, dtype=torch.float64)
    z_f, f_f = fast(points)
    z_r, f_r = ref(points)
    (z_f.square().sum() + f_f.sum()).backward()
    (z_r.square().sum() + f_r.sum()).backward()
    torch.testing.assert_close(f_f, f_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z_f, z_r, rtol=1e-10, atol=1e-12)
    for (name, p_f), p_r in zip(fast.named_parameters(), ref.parameters(), strict=True):
        assert p_f.grad is not None, name
        torch.testing.assert_close(p_f.grad, p_r.grad, rtol=1e-8, atol=1e-10, msg=name)
    torch.testing.assert_close(fast.bn4.running_var, ref.bn4.running_var)


@pytest.mark.parametrize("chunk_clouds", [1, 2, 8])
def test_dgcnn_inference_pools_in_chunks_as_the_whole_batch(chunk_clouds: int, monkeypatch) -> None:
    """Feature extraction (eval, no grad): BN folded into conv5, pooled a few clouds at a time: same."""
    import crossmoco_ray.nn.dgcnn as dgcnn

    torch.manual_seed(0)
    model = DGCNN(k=6, emb_dims=32, head_hidden=16, proj_dim=8).double()
    with torch.no_grad():  # running statistics and affine parameters far from their initial values
        model.bn5.running_mean.normal_()
        model.bn5.running_var.uniform_(0.5, 2.0)
        model.bn5.weight.uniform_(-1.0, 1.0)
        model.bn5.bias.normal_()
    model.eval()
    points = torch.randn(5, 70, 3, dtype=torch.float64)  # 5 clouds: a short last chunk for 2
    with torch.enable_grad():  # with grad (e.g. fine-tuning in eval mode): the whole batch at once
        want = model.forward_features(points)
    monkeypatch.setattr(dgcnn, "POOL_CHUNK_ELEMENTS", chunk_clouds * 70 * 32)
    with torch.no_grad():
        got = model.forward_features(points)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    h = torch.nn.functional.leaky_relu(model.bn5(model.conv5[0](_stack_edge_features(model, points))), 0.2)
    torch.testing.assert_close(got, torch.cat((h.amax(-1), h.mean(-1)), 1), rtol=1e-10, atol=1e-12)


def _stack_edge_features(model: DGCNN, points: torch.Tensor) -> torch.Tensor:
    """conv5's input ``[B, 512, N]`` from the fast blocks, as the module stack would see it."""
    from crossmoco_ray.nn.edgeconv import edge_conv_fast
    from crossmoco_ray.nn.graph import knn

    x, outs = points, []
    with torch.no_grad():
        for block in model.edge_blocks:
            x = edge_conv_fast(x, knn(x, model.k, ordered=False), block[0], block[1], 0.2)
            outs.append(x)
    return torch.cat(outs, -1).transpose(1, 2)


def test_dgcnn_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[B, N, 3\]"):
        DGCNN(k=4)(torch.randn(2, 3, 50))


def test_pointnet_and_registry() -> None:
    model = build_point_encoder("pointnet", emb_dims=64, head_hidden=32, proj_dim=16)
    assert isinstance(model, PointNet)
    z, feat = model(torch.randn(3, 40, 3))
    assert z.shape == (3, 16)
    assert feat.shape == (3, 64)
    with pytest.raises(ValueError, match="choose one of"):
        build_point_encoder("pointnet++")


@pytest.mark.parametrize(("arch", "width"), [("resnet18", 512), ("resnet50", 2048)])
def test_image_encoder_shapes_and_key_layout(arch: str, width: int) -> None:
    model = ImageEncoder(arch, proj_dim=32, head_hidden=64).eval()
    z, feat = model(torch.randn(2, 3, 32, 32))
    assert feat.shape == (2, width)
    assert z.shape == (2, 32)
    keys = model.state_dict().keys()
    assert "resnet.conv1.weight" in keys
    assert not any(k.startswith("resnet.fc.") for k in keys)
    assert model.inv_head[0].bias is None  # the paper's image head has no biases
    assert model.inv_head[3].bias is None


def test_images_to_tensor_is_totensor_plus_imagenet_normalize() -> None:
    import torchvision.transforms.functional as TF

    from crossmoco_ray.nn.image import IMAGENET_MEAN, IMAGENET_STD, images_to_tensor

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 5, 7, 3), dtype=torch.uint8, generator=g)  # [B, V, H, W, 3]
    out = images_to_tensor(images)
    assert out.shape == (2, 3, 3, 5, 7)
    assert out.is_contiguous()
    ref = TF.normalize(TF.to_tensor(images[1, 2].numpy()), list(IMAGENET_MEAN), list(IMAGENET_STD))
    torch.testing.assert_close(out[1, 2], ref)
    plain = images_to_tensor(images, normalize=False)
    torch.testing.assert_close(plain[0, 0], TF.to_tensor(images[0, 0].numpy()))
    assert images_to_tensor(out) is out  # float input is taken as converted
    view = images[:, 1]  # a strided view, as the step's views are
    cl = images_to_tensor(view, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl, images_to_tensor(view))


@pytest.mark.parametrize("normalize", [True, False])
def test_image_encoder_converts_uint8_views_in_its_weights_layout(normalize: bool) -> None:
    from crossmoco_ray.nn.image import images_to_tensor

    torch.manual_seed(0)
    model = ImageEncoder("resnet18", proj_dim=8, head_hidden=16, normalize_input=normalize).eval()
    raw = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    converted = images_to_tensor(raw, normalize)
    torch.testing.assert_close(model(raw)[0], model(converted)[0])
    assert not model.prepare_input(raw).is_contiguous(memory_format=torch.channels_last)
    model.to(memory_format=torch.channels_last)
    assert model.prepare_input(raw).is_contiguous(memory_format=torch.channels_last)
    assert not any("input_" in k for k in model.state_dict())  # derived, not saved: old files still load


def test_image_weights_from_local_file(tmp_path: Path) -> None:
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)  # torchvision layout, fc included
    model = ImageEncoder("resnet18", weights=path)
    assert torch.equal(model.resnet.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ImageEncoder("resnet18", weights=tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="missing"):
        ImageEncoder("resnet18", weights=path)


def test_image_trunk_checkpointing_is_the_same_function_and_gradient() -> None:
    """Activation checkpointing recomputes the residual stages in backward: same output, gradients and
    BatchNorm running statistics (updated once, not again by the recomputation)."""
    torch.manual_seed(0)
    plain = ImageEncoder("resnet18", proj_dim=8, head_hidden=16).train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint_trunk = True
    x = torch.randn(4, 3, 32, 32)
    outs = []
    for enc in (plain, ckpt):
        z, feat = enc(x)
        (z.square().sum() + feat.sum()).backward()
        outs.append(z)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, a), (_, b) in zip(ckpt.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), (_, b) in zip(ckpt.named_buffers(), plain.named_buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
