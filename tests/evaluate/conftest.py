"""The evaluation tests use the checkpoint fixture of tests/checkpoints: a real checkpoint of a tiny model."""

from tests.checkpoints.conftest import checkpoint

__all__ = ["checkpoint"]
