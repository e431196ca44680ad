"""The ``crossmoco`` command line: one module per command group (:mod:`.main` assembles them)."""

from crossmoco_ray.cli.main import main

__all__ = ["main"]
