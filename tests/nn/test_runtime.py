"""bf16 is used where the device has it, with a message where it does not; the allocator setting applies."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from crossmoco_ray.nn import runtime


@pytest.mark.parametrize(
    ("flags", "used"),
    [({"avx512f", "avx512_bf16"}, "bf16"), ({"avx512f", "amx_bf16", "amx_tile"}, "bf16"), ({"avx2"}, "fp32")],
)
def test_cpu_bf16_follows_the_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str], used: str) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    precision, why = runtime.resolve_precision("bf16", torch.device("cpu"))
    assert precision == used
    if used == "fp32":
        assert why is not None
        assert "no native bf16" in why
        assert "training in fp32" in why
    else:
        assert why is None
    assert runtime.resolve_precision("fp32", torch.device("cpu")) == ("fp32", None)


def test_cpu_description_names_the_model_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "sse2"}))
    assert runtime.cpu_description().endswith("(avx512f avx512_bf16)")


def _keeps(env: dict[str, str]) -> str:
    code = "from crossmoco_ray.nn.runtime import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def test_keep_freed_memory_applies_on_glibc_and_can_be_switched_off() -> None:
    base = {k: v for k, v in os.environ.items() if k != "CROSSMOCO_MALLOC"}
    assert _keeps({**base, "CROSSMOCO_MALLOC": "system"}) == "False"
    if platform.libc_ver()[0] == "glibc":
        assert _keeps(base) == "True"
