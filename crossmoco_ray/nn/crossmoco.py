"""CrossMoCo: multi-modal momentum contrast between point clouds and rendered views (METHOD.md §2).

Online encoders (point + image, each with its projection head) are trained; momentum copies of both
produce keys; two queues hold negative keys. One step, in MoCo's order:

1. momentum update of the key encoders (parameters only; BatchNorm statistics are their own);
2. keys of the second point augmentation and of the other rendered views (no gradient, shuffle-BN
   across workers); with more than two views the image key is the mean of the key views' unit vectors,
   not re-normalised, as in the original code;
3. queries of the first point augmentation and of rendered view 0;
4. logits and losses:
   - ``loss_point``: InfoNCE(point query, point key, point queue),
   - ``loss_image``: InfoNCE(image query, image key, image queue),
   - ``loss_cross``: NT-Xent(online point embedding, online image embedding), in-batch negatives
     (optionally from all workers);
5. gather the keys of all workers and enqueue them (after the logits, so this step's keys are not
   among its own negatives).

The key encoders stay in whatever mode the module is in; in training that is train mode (BatchNorm
uses the key batch's statistics), as in the original.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from crossmoco_ray.nn.distributed import batch_shuffle, batch_unshuffle
from crossmoco_ray.nn.losses import info_nce, nt_xent
from crossmoco_ray.nn.precision import at_least_fp32, fp32_maths
from crossmoco_ray.nn.queue import MemoryQueue


class CrossMoCo(nn.Module):
    """CrossMoCo around an online point encoder and an online image encoder.

    Each encoder maps its input to ``(projection [B, dim], feature [B, F])``.

    Args:
        point_encoder: online point encoder (points ``[B, N, 3]``); its momentum copy is made here.
        image_encoder: online image encoder (images ``[B, 3, H, W]``).
        queue_length: keys per queue ``K`` (paper: 4000); a multiple of the global batch.
        dim: projection dimension (paper: 256).
        temperature: InfoNCE temperature ``T`` (paper: 0.1).
        cross_temperature: NT-Xent temperature of the cross-modal term (paper: 0.1).
        loss_weights: weights of (point, image, cross) terms (paper: 1, 1, 1).
        shuffle_bn: shuffle the key batch across workers before the key encoders (no-op in one process).
        cross_negatives: ``"global"`` takes the cross-modal negatives from all workers (equals the
            single-process loss on the global batch); ``"local"`` uses this worker's batch only.
    """

    def __init__(
        self,
        point_encoder: nn.Module,
        image_encoder: nn.Module,
        *,
        queue_length: int,
        dim: int = 256,
        temperature: float = 0.1,
        cross_temperature: float = 0.1,
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0),
        shuffle_bn: bool = True,
        cross_negatives: Literal["global", "local"] = "global",
    ) -> None:
        super().__init__()
        if cross_negatives not in ("global", "local"):
            raise ValueError(f"cross_negatives must be 'global' or 'local', got {cross_negatives!r}")
        self.point_q, self.image_q = point_encoder, image_encoder
        self.point_k, self.image_k = copy.deepcopy(point_encoder), copy.deepcopy(image_encoder)
        for p in (*self.point_k.parameters(), *self.image_k.parameters()):
            p.requires_grad_(False)
        self.queue = MemoryQueue(queue_length, dim, names=("point", "image"))
        self.temperature, self.cross_temperature = temperature, cross_temperature
        self.loss_weights = tuple(float(w) for w in loss_weights)
        self.shuffle_bn, self.cross_negatives = shuffle_bn, cross_negatives

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """``θ_k ← m·θ_k + (1 − m)·θ_q`` for both modalities (parameters only)."""
        for online, key in ((self.point_q, self.point_k), (self.image_q, self.image_k)):
            k_params: list[torch.Tensor] = list(key.parameters())
            q_params: list[torch.Tensor] = list(online.parameters())
            torch._foreach_mul_(k_params, momentum)
            torch._foreach_add_(k_params, q_params, alpha=1.0 - momentum)

    @torch.no_grad()
    def _key(self, encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Normalised key embedding ``[B, dim]`` of ``x``, with shuffle-BN across workers."""
        if self.shuffle_bn:
            x, idx_unshuffle = batch_shuffle(x)
        k = F.normalize(at_least_fp32(encoder(x)[0]), dim=1)
        return batch_unshuffle(k, idx_unshuffle) if self.shuffle_bn else k

    def forward(
        self,
        points1: torch.Tensor,
        points2: torch.Tensor,
        images: torch.Tensor | Sequence[torch.Tensor],
        momentum: float,
        enqueue: bool = True,
    ) -> dict[str, torch.Tensor]:
        """One CrossMoCo forward on this worker's batch.

        Args:
            points1, points2: two augmentations of the same clouds ``[B, N, 3]``.
            images: ``V ≥ 2`` distinct rendered views, ``[B, V, 3, H, W]`` or a sequence of ``[B, 3, H, W]``.
            momentum: key-encoder momentum ``m`` for this step (a schedule lives in the caller).
            enqueue: write this step's gathered keys into the queues.
        Returns:
            ``loss``, ``loss_point``, ``loss_image``, ``loss_cross`` (with gradient) and detached
            diagnostics (:func:`diagnostics`): ``{point,image}_{pos_sim,neg_sim,top1}``, ``cross_top1``,
            alignment and uniformity, the spread of the projections and of the point feature.
        """
        views = list(images.unbind(1)) if isinstance(images, torch.Tensor) else list(images)
        if len(views) < 2:
            raise ValueError(f"CrossMoCo needs at least 2 rendered views per object, got {len(views)}")
        self.momentum_update(momentum)

        k_point = self._key(self.point_k, points2)  # B×C
        # mean of the key views' unit vectors, not re-normalised (original code)          B×C
        k_image = torch.stack([self._key(self.image_k, v) for v in views[1:]]).mean(dim=0)

        proj_point, feat_point = self.point_q(points1)
        z_point = at_least_fp32(proj_point)  # B×C (un-normalised, for NT-Xent)
        z_image = at_least_fp32(self.image_q(views[0])[0])
        q_point, q_image = F.normalize(z_point, dim=1), F.normalize(z_image, dim=1)

        # clone: the queue changes in place at enqueue, after these logits are saved for backward
        loss_point, logits_point = info_nce(q_point, k_point, self.queue["point"].clone(), self.temperature)
        loss_image, logits_image = info_nce(q_image, k_image, self.queue["image"].clone(), self.temperature)
        loss_cross = nt_xent(
            z_point, z_image, self.cross_temperature, gather_distributed=self.cross_negatives == "global"
        )
        w_point, w_image, w_cross = self.loss_weights
        loss = w_point * loss_point + w_image * loss_image + w_cross * loss_cross

        if enqueue:
            self.queue.enqueue(k_point, k_image)

        out = {"loss": loss, "loss_point": loss_point, "loss_image": loss_image, "loss_cross": loss_cross}
        for name, logits in (("point", logits_point), ("image", logits_image)):
            out.update(_logit_diagnostics(name, logits.detach(), self.temperature))
        out.update(
            diagnostics(
                q_point.detach(), k_point, q_image.detach(), k_image, at_least_fp32(feat_point.detach())
            )
        )
        return out


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Wang & Isola (2020): ``log E exp(−t‖z_i − z_j‖²)`` over pairs of unit vectors (lower: more uniform)."""
    if z.shape[0] < 2:
        return torch.zeros((), device=z.device)
    return torch.pdist(z, p=2).pow(2).mul(-t).exp().mean().log()


def unit_spread(x: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of the rows' unit vectors × √dim: about 1 when spread, 0 when collapsed."""
    u = F.normalize(x, dim=1)
    return u.std(dim=0).mean() * x.shape[1] ** 0.5 if x.shape[0] > 1 else torch.zeros((), device=x.device)


@torch.no_grad()
def diagnostics(
    q_point: torch.Tensor,
    k_point: torch.Tensor,
    q_image: torch.Tensor,
    k_image: torch.Tensor,
    feat_point: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Whether learning is healthy, from one step's (local) batch, all detached:

    - ``*_align``: mean ``‖a − b‖²`` of positive pairs of unit vectors (0: identical; 2: orthogonal),
      for point query/key, image query/key and point/image (the cross-modal pair);
    - ``*_uniform``: uniformity of the point and image queries (Wang & Isola 2020);
    - ``cross_top1``: how often an object's point embedding is nearest to its own image embedding among
      the batch's images (the cross-modal term's in-batch retrieval accuracy);
    - ``point_proj_spread`` / ``point_feat_spread``: :func:`unit_spread` of the point projections and of
      the backbone feature (collapse shows as values near 0).

    All in fp32, whatever the autocast around.
    """
    with fp32_maths(q_point.device.type):
        q_point, k_point, q_image, k_image, feat_point = (
            at_least_fp32(t) for t in (q_point, k_point, q_image, k_image, feat_point)
        )
        k_image_unit = F.normalize(k_image, dim=1)
        cross = q_point @ q_image.t()
        target = torch.arange(cross.shape[0], device=cross.device)
        return {
            "point_align": (q_point - k_point).pow(2).sum(1).mean(),
            "image_align": (q_image - k_image_unit).pow(2).sum(1).mean(),
            "cross_align": (q_point - q_image).pow(2).sum(1).mean(),
            "point_uniform": uniformity(q_point),
            "image_uniform": uniformity(q_image),
            "cross_top1": (cross.argmax(dim=1) == target).float().mean(),
            "point_proj_spread": unit_spread(q_point),
            "point_feat_spread": unit_spread(feat_point),
        }


def _logit_diagnostics(name: str, logits: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Mean positive / negative cosine similarity and the InfoNCE top-1 accuracy of ``[N, 1+K]`` logits."""
    sims = logits * temperature
    return {
        f"{name}_pos_sim": sims[:, 0].mean(),
        f"{name}_neg_sim": sims[:, 1:].mean(),
        f"{name}_top1": (logits.argmax(dim=1) == 0).float().mean(),
    }
