"""The point encoders by name: what a config's ``model.point_encoder`` and a checkpoint's ``encoder.name``
choose from (a plain dict, :data:`POINT_ENCODERS`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from crossmoco_ray.nn.dgcnn import DGCNN
from crossmoco_ray.nn.dgcnn_seg import DGCNNSeg
from crossmoco_ray.nn.pointnet import PointNet

POINT_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "dgcnn": DGCNN,
    "dgcnn_seg": DGCNNSeg,
    "pointnet": PointNet,
}


def build_point_encoder(name: str, **kwargs: Any) -> nn.Module:
    """A point encoder from :data:`POINT_ENCODERS` by name."""
    if name not in POINT_ENCODERS:
        raise ValueError(f"unknown point encoder {name!r}; choose one of {sorted(POINT_ENCODERS)}")
    return POINT_ENCODERS[name](**kwargs)
