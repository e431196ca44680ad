"""Clouds in the frame the encoders see: centred on their centroid, scaled to the unit sphere (as training,
the monitor, evaluation, fine-tuning and exported models all do)."""

from __future__ import annotations

import torch


def normalize_clouds(points: torch.Tensor) -> torch.Tensor:
    """Centre each cloud ``[B, N, 3]`` on its centroid and scale it to unit max radius (as training does)."""
    centred = points - points.mean(dim=1, keepdim=True)
    radius = centred.norm(dim=2).amax(dim=1).clamp_min(1e-12)
    return centred / radius[:, None, None]
