"""Hyperparameter search on Ray Tune: search spaces (:mod:`.space`) and the search driver (:mod:`.search`)."""

from crossmoco_ray.tuning.space import Dimension, Space, check_space, load_space, parse_space

__all__ = ["Dimension", "Space", "check_space", "load_space", "parse_space"]
