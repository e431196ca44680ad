"""The core: encoders, heads, losses, the queue, distributed helpers and the CrossMoCo module.

Imports only torch, torchvision and numpy, and takes plain arguments (no config object), so it runs
where Ray, MLflow and pydantic are absent (a bare GPU box, a notebook). The names below load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from crossmoco_ray.nn.point_encoders import POINT_ENCODERS, build_point_encoder
    from crossmoco_ray.nn.pointnet import PointNet
    from crossmoco_ray.nn.queue import MemoryQueue

# Names are imported on first use (PEP 562), so that a torch-free submodule (``cpu``, ``native``,
# ``trusted_files``: the compiled renderer's builder, imported by data workers) loads without torch.
_WHERE = {
    "CrossMoCo": "crossmoco",
    "DGCNN": "dgcnn",
    "DGCNNSeg": "dgcnn_seg",
    "PartSegmenter": "dgcnn_seg",
    "batch_shuffle": "distributed",
    "batch_unshuffle": "distributed",
    "concat_all_gather": "distributed",
    "convert_sync_batchnorm": "distributed",
    "gather_with_grad": "distributed",
    "is_distributed": "distributed",
    "rank": "distributed",
    "world_size": "distributed",
    "edge_conv_fast": "edgeconv",
    "edge_conv_reference": "edgeconv",
    "load_checked": "foreign_weights",
    "strip_prefixes": "foreign_weights",
    "knn": "graph",
    "image_head": "heads",
    "point_head": "heads",
    "IMAGE_TRUNKS": "image",
    "ImageEncoder": "image",
    "info_nce": "losses",
    "nt_xent": "losses",
    "PointNet": "pointnet",
    "MemoryQueue": "queue",
    "POINT_ENCODERS": "point_encoders",
    "build_point_encoder": "point_encoders",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


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
