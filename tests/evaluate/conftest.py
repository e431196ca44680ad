"""The evaluation tests use the checkpoint fixture of tests/checkpoints ."""

from tests.checkpoints.conftest import checkpoint

__all__ = ["checkpoint"]
