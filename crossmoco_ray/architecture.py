"""Config → core objects: encoders, the CrossMoCo module, optimizer, schedules. No Ray here.

The core takes plain arguments; this is the one place that maps configuration sections onto them, used by
the Ray worker loop, the evaluation commands and the benchmarks alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from crossmoco_ray.config.loading import Config, ModelConfig
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


def build_optimizer(cfg: Config, model: CrossMoCo) -> torch.optim.Optimizer:
    """Only the online encoders (and their heads) are optimised, as in CrossMoCo.

    On CUDA the fused implementations (one kernel for all parameters, the step count kept on the device:
    no host reads), elsewhere torch's default; the same update either way.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    o, lr = cfg.optim, cfg.base_lr
    fused = True if params and all(p.is_cuda for p in params) else None
    if o.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o.weight_decay, fused=fused)
    if o.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=o.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, momentum=o.sgd_momentum, weight_decay=o.weight_decay, fused=fused)


def lr_at(cfg: Config, epoch: int, frac: float = 0.0) -> float:
    """The learning rate at ``epoch`` (0-based) plus ``frac`` of it.

    ``cosine`` is CrossPoint/CrossMoCo's ``CosineAnnealingLR(T_max=epochs)`` stepped once at the start of
    every epoch: epoch e runs at the cosine value of step e + 1 (so the last epoch runs at ``min_lr``; kept
    for faithfulness). ``cosine_smooth`` follows the cosine per step. Warm-up rises linearly first. The peak
    is ``cfg.base_lr``: ``optim.lr``, scaled with the global batch when ``optim.lr_scaling`` says so.
    """
    o, epochs, peak = cfg.optim, cfg.train.epochs, cfg.base_lr
    if epoch < o.warmup_epochs:
        return peak * (epoch + (frac if o.schedule == "cosine_smooth" else 1.0)) / o.warmup_epochs
    if o.schedule == "constant":
        return peak
    span = max(epochs - o.warmup_epochs, 1)
    t = epoch - o.warmup_epochs + (frac if o.schedule == "cosine_smooth" else 1.0)
    return o.min_lr + (peak - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))


def momentum_at(cfg: Config, step: int, total_steps: int) -> float:
    """Key-encoder momentum at ``step``: constant, or BYOL's cosine rise from ``momentum`` to 1."""
    m = cfg.objective.momentum
    if cfg.objective.momentum_schedule == "constant" or total_steps <= 0:
        return m
    return 1 - (1 - m) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
