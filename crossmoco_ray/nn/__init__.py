"""The core: encoders, heads, losses, the queue, distributed helpers and the CrossMoCo module.

Imports only torch, torchvision and numpy, and takes plain arguments (no config object), so it runs
where Ray, MLflow and pydantic are absent (a bare GPU box, a notebook).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from crossmoco_ray.nn.crossmoco import CrossMoCo
from crossmoco_ray.nn.dgcnn import DGCNN
from crossmoco_ray.nn.dgcnn_seg import DGCNNSeg, PartSegmenter
from crossmoco_ray.nn.distributed import (
    batch_shuffle,
    batch_unshuffle,
    concat_all_gather,
    convert_sync_batchnorm,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)
from crossmoco_ray.nn.edgeconv import edge_conv_fast, edge_conv_reference
from crossmoco_ray.nn.foreign_weights import load_checked, strip_prefixes
from crossmoco_ray.nn.graph import knn
from crossmoco_ray.nn.heads import image_head, point_head
from crossmoco_ray.nn.image import IMAGE_TRUNKS, ImageEncoder
from crossmoco_ray.nn.losses import info_nce, nt_xent
from crossmoco_ray.nn.pointnet import PointNet
from crossmoco_ray.nn.queue import MemoryQueue

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


__all__ = [
    "DGCNN",
    "IMAGE_TRUNKS",
    "POINT_ENCODERS",
    "CrossMoCo",
    "DGCNNSeg",
    "ImageEncoder",
    "MemoryQueue",
    "PartSegmenter",
    "PointNet",
    "batch_shuffle",
    "batch_unshuffle",
    "build_point_encoder",
    "concat_all_gather",
    "convert_sync_batchnorm",
    "edge_conv_fast",
    "edge_conv_reference",
    "gather_with_grad",
    "image_head",
    "info_nce",
    "is_distributed",
    "knn",
    "load_checked",
    "nt_xent",
    "point_head",
    "rank",
    "strip_prefixes",
    "world_size",
]
