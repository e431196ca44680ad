"""What the machine can do for a step: bf16 on this device, fp32 where the maths needs it, the CUDA
policies (TF32, cuDNN autotuning, determinism), and a CPU allocator that keeps freed memory.

- :func:`bf16_support` tells whether bf16 autocast pays off here: on CUDA when the GPU computes bf16
  natively (compute capability 8.0 or newer: A100, H100, L4, ...; ``torch.cuda.is_bf16_supported()`` also
  counts the emulation of older GPUs such as the T4, which is slower than fp32), on CPU when the cores have
  native bf16 instructions (AVX-512 BF16 or AMX; without them oneDNN emulates bf16, which is not expected
  to pay off: not measured here). :func:`resolve_precision` turns the requested precision into the one
  used, with a message saying why when they differ.
- :func:`fp32_maths`: a block whose matrix products are IEEE fp32 whatever the autocast or TF32 setting
  around it (the kNN distances, the BatchNorm statistics, the contrastive logits and losses).
- :func:`configure_kernels`: TF32 on or off for the encoders' fp32 products and convolutions, cuDNN's
  autotuner, and deterministic kernels (``CUBLAS_WORKSPACE_CONFIG`` included), once per process.
- :func:`keep_freed_memory` stops glibc from giving large freed blocks back to the OS. A training step
  allocates and frees the same large tensors every step; by default each block above 32 MiB is a fresh
  ``mmap`` whose every page faults on first touch, which on CPU costs as much as the arithmetic of
  element-wise ops (bench/step.py's two reference rows show the effect: 45.6 vs 20.2 s). The price: the
  process keeps its peak resident size between steps, and fragmentation can lift it above the peak the
  tensors need (bench/RESULTS.md: the materialising reference step's RSS went from 7.3 to 14.8 GB). Set
  ``CROSSMOCO_MALLOC=system`` to leave glibc's defaults alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Literal

import torch

from crossmoco_ray.nn.cpu import cpu_flags, cpu_name

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_description() -> str:
    """CPU model and its bf16-relevant flags, e.g. ``AMD EPYC (avx512f avx512_bf16)``."""
    flags = cpu_flags()
    shown = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{cpu_name()} ({' '.join(shown) or 'no AVX-512'})"


# Compute capability from which NVIDIA GPUs have bf16 tensor cores (Ampere); older ones emulate bf16.
NATIVE_BF16_CAPABILITY = (8, 0)


def cuda_bf16_support(name: str, capability: tuple[int, int]) -> str | None:
    """``None`` when a GPU of this compute capability computes bf16 natively, else why it does not."""
    if tuple(capability) >= NATIVE_BF16_CAPABILITY:
        return None
    major, minor = capability
    return (
        f"{name} (compute capability {major}.{minor}) has no native bf16: it would be emulated, slower "
        "than fp32 (native bf16 needs compute capability 8.0 or newer: A100, A10, L4, H100, ...)"
    )


def bf16_support(device: torch.device) -> str | None:
    """``None`` when bf16 autocast is worth using on ``device``, else the reason it is not."""
    if device.type == "cuda":
        return cuda_bf16_support(torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        if not any(f in cpu_flags() for f in BF16_CPU_FLAGS):
            return f"this CPU ({cpu_description()}) has no native bf16 (AVX-512 BF16 or AMX)"
        return None
    return f"bf16 autocast is not supported on {device.type}"


def resolve_precision(requested: str, device: torch.device) -> tuple[Literal["fp32", "bf16"], str | None]:
    """(precision used, message when it differs from the request)."""
    if requested != "bf16":
        return "fp32", None
    reason = bf16_support(device)
    if reason is None:
        return "bf16", None
    return "fp32", f"train.precision=bf16 requested, but {reason}: training in fp32"


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or fp64 if it is (what a :func:`fp32_maths` block reads, whatever made it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@contextmanager
def fp32_maths(device_type: str) -> Iterator[None]:
    """A block computed in fp32 with IEEE matrix products: autocast off, and on CUDA no TF32 even where
    the process allows it (:func:`configure_kernels`, or the user's ``torch.set_float32_matmul_precision``).

    Inputs are not cast here: the block casts what it reads (``x.float()``). The backward of the block's
    products runs outside it, under the process's setting (a gradient in TF32 is as any TF32 training).
    """
    with torch.autocast(device_type=device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        restore = _ieee_matmuls()
        try:
            yield
        finally:
            restore()


def _legacy_tf32_api() -> bool:
    """Whether this process sets TF32 through torch's older API (``set_float32_matmul_precision``,
    ``cudnn.allow_tf32``), the default, rather than the per-backend ``fp32_precision``: torch refuses to
    read the setting once both were used, so whatever is changed here goes through the one in use."""
    try:
        torch.get_float32_matmul_precision()
    except RuntimeError:
        return False
    return True


def _ieee_matmuls() -> Callable[[], None]:
    """Turn TF32 matmuls off; returns what restores the previous setting."""
    if not _legacy_tf32_api():
        matmul = torch.backends.cuda.matmul
        before_new = matmul.fp32_precision
        if before_new == "ieee":
            return lambda: None
        matmul.fp32_precision = "ieee"
        return lambda: setattr(matmul, "fp32_precision", before_new)
    before = torch.get_float32_matmul_precision()
    if before == "highest":
        return lambda: None
    torch.set_float32_matmul_precision("highest")
    return lambda: torch.set_float32_matmul_precision(before)


# cuBLAS's deterministic workspace (NVIDIA's cuBLAS docs, "Results reproducibility"; torch requires it).
CUBLAS_WORKSPACE = ":4096:8"


def configure_kernels(tf32: bool, deterministic: bool) -> None:
    """Process-wide settings of a training worker, before its first CUDA product.

    - ``tf32``: TF32 tensor cores for the encoders' fp32 matrix products and cuDNN convolutions (Ampere and
      newer; ~10 mantissa bits); off: IEEE fp32 everywhere, cuDNN convolutions included (torch's own
      default runs those in TF32). :func:`fp32_maths` blocks stay IEEE either way.
    - ``deterministic``: deterministic kernels only (an op without one raises, naming itself, instead of
      silently varying), cuBLAS's fixed workspace, no cuDNN autotuning; otherwise cuDNN benchmarks the
      convolution algorithms once per input shape (the views are one fixed size).
    """
    if deterministic:
        # read when cuBLAS creates its handle (the first product on the device): set before that
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    if _legacy_tf32_api():
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = tf32
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32" if tf32 else "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32" if tf32 else "ieee"  # type: ignore[attr-defined]


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


@cache
def keep_freed_memory() -> bool:
    """Keep freed memory in the process for reuse (glibc ``mallopt``); ``False`` where not applied."""
    if os.environ.get("CROSSMOCO_MALLOC", "keep") == "system" or platform.system() != "Linux":
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    # every allocation from the heap, which is never trimmed: freed blocks are reused, not re-faulted
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**62))
