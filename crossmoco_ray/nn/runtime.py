"""What the machine can do for a step: bf16 on this device, and a CPU allocator that keeps freed memory.

- :func:`bf16_support` tells whether bf16 autocast pays off here: on CUDA when the GPU supports bf16,
  on CPU when the cores have native bf16 instructions (AVX-512 BF16 or AMX; without them oneDNN
  emulates bf16, which is not expected to pay off: not measured here). :func:`resolve_precision` turns
  the requested precision into the one used, with a message saying why when they differ.
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
from functools import cache
from pathlib import Path
from typing import Literal

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@cache
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_description() -> str:
    """CPU model and its bf16-relevant flags, e.g. ``AMD EPYC (avx512f avx512_bf16)``."""
    flags = cpu_flags()
    shown = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{cpu_name()} ({' '.join(shown) or 'no AVX-512'})"


def bf16_support(device: torch.device) -> str | None:
    """``None`` when bf16 autocast is worth using on ``device``, else the reason it is not."""
    if device.type == "cuda":
        return None if torch.cuda.is_bf16_supported() else f"{torch.cuda.get_device_name(device)} has no bf16"
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
