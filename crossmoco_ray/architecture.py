"""The architecture a configuration describes: its encoders and the CrossMoCo module. No Ray here.

The core takes plain arguments; this is the one place that maps the model section onto them, used by the
pretraining job, checkpoints (which rebuild a stored config's model), evaluation and the benchmarks alike.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from crossmoco_ray.config.schema import Config, ModelConfig
from crossmoco_ray.nn import CrossMoCo, ImageEncoder, build_point_encoder


def point_encoder_spec(m: ModelConfig) -> dict[str, Any]:
    """``{"name": ..., "kwargs": {...}}`` of the point encoder a model section describes."""
    if m.point_encoder == "dgcnn":
        kwargs: dict[str, Any] = dict(
            k=m.k,
            emb_dims=m.emb_dims,
            proj_dim=m.proj_dim,
            head_hidden=m.point_head_hidden,
            edgeconv=m.edgeconv,
        )
    elif m.point_encoder == "dgcnn_seg":
        kwargs = dict(k=m.k, emb_dims=m.emb_dims, proj_dim=m.proj_dim, head_hidden=m.point_head_hidden)
    else:
        kwargs = dict(emb_dims=m.emb_dims, proj_dim=m.proj_dim, head_hidden=m.point_head_hidden)
    return {"name": m.point_encoder, "kwargs": kwargs}


def make_point_encoder(m: ModelConfig) -> nn.Module:
    spec = point_encoder_spec(m)
    return build_point_encoder(spec["name"], **spec["kwargs"])


def make_image_encoder(m: ModelConfig, normalize_input: bool = True) -> ImageEncoder:
    """The image encoder of a model section; ``normalize_input``: ImageNet normalisation of uint8 views
    (``data.image_augment.normalize``)."""
    return ImageEncoder(
        m.image_encoder,
        proj_dim=m.proj_dim,
        head_hidden=m.image_head_hidden,
        weights=m.image_weights,
        checkpoint_trunk=m.image_checkpoint,
        normalize_input=normalize_input,
    )


def build_model(cfg: Config) -> CrossMoCo:
    """The CrossMoCo module of a configuration (random init, or ImageNet trunk weights from a local file)."""
    o = cfg.objective
    return CrossMoCo(
        make_point_encoder(cfg.model),
        make_image_encoder(cfg.model, cfg.data.image_augment.normalize),
        queue_length=o.queue_length,
        dim=cfg.model.proj_dim,
        temperature=o.temperature,
        cross_temperature=o.cross_temperature,
        loss_weights=(o.weight_point, o.weight_image, o.weight_cross),
        shuffle_bn=o.shuffle_bn,
        cross_negatives=o.cross_negatives,
    )
