"""bf16 is used where the device has it, with a message where it does not; the allocator setting applies."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from crossmoco_ray.nn import precision as runtime


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
    code = "from crossmoco_ray.nn.precision import keep_freed_memory; print(keep_freed_memory())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip()


def test_keep_freed_memory_applies_on_glibc_and_can_be_switched_off() -> None:
    base = {k: v for k, v in os.environ.items() if k != "CROSSMOCO_MALLOC"}
    assert _keeps({**base, "CROSSMOCO_MALLOC": "system"}) == "False"
    if platform.libc_ver()[0] == "glibc":
        assert _keeps(base) == "True"


@pytest.mark.parametrize(
    ("name", "capability", "used"),
    [("Tesla T4", (7, 5), "fp32"), ("Tesla V100-SXM2-16GB", (7, 0), "fp32"),
     ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"), ("NVIDIA H100 80GB HBM3", (9, 0), "bf16")],
)  # fmt: skip
def test_cuda_bf16_needs_native_support_not_emulation(
    monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int], used: str
) -> None:
    """torch.cuda.is_bf16_supported() is True on a T4, which only emulates bf16: the capability decides."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: name)
    precision, why = runtime.resolve_precision("bf16", torch.device("cuda", 0))
    assert precision == used
    if used == "fp32":
        assert why is not None
        assert f"{name} (compute capability {capability[0]}.{capability[1]})" in why
        assert "emulated" in why
        assert "training in fp32" in why


def test_fp32_maths_turns_tf32_off_inside_and_restores_it() -> None:
    """Whatever TF32 setting the process has (either of torch's two APIs), a block is IEEE fp32 inside."""
    code = """
import torch
from crossmoco_ray.nn.precision import configure_kernels, fp32_maths
configure_kernels(tf32=True, deterministic=False)
assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
with fp32_maths("cuda"):
    assert torch.get_float32_matmul_precision() == "highest"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pass
assert torch.get_float32_matmul_precision() == "high"
with torch.autocast("cpu", dtype=torch.bfloat16), fp32_maths("cpu"):
    assert not torch.is_autocast_enabled("cpu")
configure_kernels(tf32=False, deterministic=False)
assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
assert torch.backends.cudnn.benchmark
torch.backends.cuda.matmul.fp32_precision = "tf32"  # the newer API: the legacy one cannot be read now
with fp32_maths("cuda"):
    assert torch.backends.cuda.matmul.fp32_precision == "ieee"
assert torch.backends.cuda.matmul.fp32_precision == "tf32"
configure_kernels(tf32=False, deterministic=True)
assert torch.backends.cuda.matmul.fp32_precision == "ieee"
assert torch.backends.cudnn.conv.fp32_precision == "ieee"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_deterministic_kernels_set_the_cublas_workspace_and_refuse_nondeterministic_ops() -> None:
    code = """
import os, torch
from crossmoco_ray.nn.precision import configure_kernels
os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
configure_kernels(tf32=False, deterministic=True)
assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
assert torch.are_deterministic_algorithms_enabled()
assert not torch.is_deterministic_algorithms_warn_only_enabled()
assert not torch.backends.cudnn.benchmark
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
