"""The pretraining optimizer and its schedules: what is optimised, the learning rate per epoch (or step)
and the key encoders' momentum per step (METHOD.md §2.2)."""

from __future__ import annotations

import math

import torch

from crossmoco_ray.config.schema import Config
from crossmoco_ray.nn import CrossMoCo


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


def lr_at(cfg: Config, epoch: int, frac: float = 0.0, peak: float | None = None) -> float:
    """The learning rate at ``epoch`` (0-based) plus ``frac`` of it.

    ``cosine`` is CrossPoint/CrossMoCo's ``CosineAnnealingLR(T_max=epochs)`` stepped once at the start of
    every epoch: epoch e runs at the cosine value of step e + 1 (so the last epoch runs at ``min_lr``; kept
    for faithfulness). ``cosine_smooth`` follows the cosine per step (``frac``: the epoch's samples done, of
    its samples). Warm-up rises linearly first. The peak is ``cfg.base_lr``: ``optim.lr``, scaled with the
    global batch when ``optim.lr_scaling`` says so (an elastic run passes the peak of its current global
    batch, ``cfg.base_lr_at``).
    """
    o, epochs = cfg.optim, cfg.train.epochs
    peak = cfg.base_lr if peak is None else peak
    if epoch < o.warmup_epochs:
        return peak * (epoch + (frac if o.schedule == "cosine_smooth" else 1.0)) / o.warmup_epochs
    if o.schedule == "constant":
        return peak
    span = max(epochs - o.warmup_epochs, 1)
    t = epoch - o.warmup_epochs + (frac if o.schedule == "cosine_smooth" else 1.0)
    return o.min_lr + (peak - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span))


def momentum_at(cfg: Config, step: int, total_steps: int) -> float:
    """Key-encoder momentum at ``step`` of ``total_steps``: constant, or BYOL's cosine rise from
    ``momentum`` to 1. The training loop counts both in samples (``Context.schedule_position``), so a run
    that changes its world size follows the same curve; ``step / total_steps`` is the same number either
    way for a fixed-size run."""
    m = cfg.objective.momentum
    if cfg.objective.momentum_schedule == "constant" or total_steps <= 0:
        return m
    return 1 - (1 - m) * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
