"""The pretraining job: what differs from fine-tuning (the CrossMoCo model, its step, the monitor) on the
spine of :mod:`crossmoco_ray.runs`. ``from crossmoco_ray.pretrain import pretrain`` runs it from Python."""

from crossmoco_ray.pretrain.driver import pretrain

__all__ = ["pretrain"]
