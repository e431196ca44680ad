"""CUDA without a GPU: the project's code run on fake CUDA tensors (shapes, dtypes and devices, no data).

- :func:`fake_cuda`: a ``FakeTensorMode`` in which ``device="cuda"`` tensors exist on a CPU-only machine,
  with what torch asks the driver for answered as an H100 would (CUDA available, native bf16, compute
  capability 9.0), so CUDA autocast and the CUDA branches of the code run.
- :func:`backward`: the backward pass, node by node, without torch's autograd engine. Since torch 2.11
  the engine asks the CUDA driver about every CUDA device a backward touches, which fails on fake devices;
  calling each node's backward directly does what the engine does for a single-threaded backward (sum the
  incoming gradients, reduce and cast them to the input's shape and dtype, no hooks run).
  ``tests/pretrain/test_gpu_path.py`` checks it against torch's engine on a real CPU model first.
- :class:`DeviceWatch`: a dispatch mode that records what the code asks of the device: every read back to
  the host (``.item()``, ``bool(t)``, ``.tolist()``, and ops whose output size depends on the data, which
  the real CUDA kernels would have to read back), every copy from host memory onto the device, and every
  op with the dtypes it ran in. A read is answered with a plausible value, so the code runs on past it and
  every one is found; each is named by the innermost function of the project that asked for it.
"""

from __future__ import annotations

import contextlib
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

# ops whose output shape depends on the values: on CUDA each waits for the device
DATA_DEPENDENT = {
    "aten::nonzero",
    "aten::unique",
    "aten::_unique",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::masked_select",
    "aten::repeat_interleave.Tensor",
    "aten::_local_scalar_dense",
}


@dataclass
class DeviceWatch(TorchDispatchMode):
    """Records host reads, host-to-device copies and ops (see the module's docstring)."""

    reads: list[str] = field(default_factory=list)  # who read: the project's frames, outermost first
    uploads: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (who, shape)
    ops: dict[str, set[tuple[str, ...]]] = field(default_factory=lambda: defaultdict(set))  # op → dtypes

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.name()
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        self.ops[name].add(tuple(str(t.dtype).removeprefix("torch.") for t in tensors))
        if on_cuda and (name in DATA_DEPENDENT or name.split(".")[0] in DATA_DEPENDENT):
            self.reads.append(f"{_caller()} ({name})")
            if func is torch.ops.aten._local_scalar_dense.default:
                return 1.0 if args[0].is_floating_point() else 1  # plausible, and the run goes on
        if name in ("aten::_to_copy", "aten::copy_"):
            src = args[1] if name == "aten::copy_" else args[0]
            dst_cuda = (
                (args[0].device.type == "cuda")
                if name == "aten::copy_"
                else (str(kwargs.get("device", "")).startswith("cuda"))
            )
            if src.device.type == "cpu" and dst_cuda and src.dim() > 0:
                self.uploads.append((_caller(), tuple(src.shape)))
        return func(*args, **kwargs)

    def dtypes_of(self, op: str) -> set[str]:
        """Every dtype op ``op`` read (over all its calls)."""
        return {d for call in self.ops.get(op, set()) for d in call}


def _caller() -> str:
    """The project's frames that led here, outermost first: ``module.py:function:line > ...`` (else the
    innermost frame)."""
    frames = traceback.extract_stack()[:-2]
    ours = [f for f in frames if "crossmoco_ray" in f.filename]
    if not ours:
        return f"{frames[-1].filename}:{frames[-1].name}:{frames[-1].lineno}"
    return " > ".join(f"{f.filename.split('crossmoco_ray/')[-1]}:{f.name}:{f.lineno}" for f in ours)


@contextlib.contextmanager
def fake_cuda() -> Iterator[FakeTensorMode]:
    """A fake-tensor mode in which ``Tensor.backward`` runs :func:`backward`.

    Move a (real, CPU) model onto its fake GPU with :func:`to_fake_cuda`, make tensors with
    ``device="cuda"``, then run the code under :func:`h100`.
    """
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "backward", lambda self, *a, **k: backward(self))
        yield mode


def to_fake_cuda(module: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """``module`` with every parameter and buffer a fake CUDA copy of itself (same strides, so a
    channels-last weight stays channels-last). ``Module.to`` cannot do this: it swaps tensors in place,
    which fake tensors refuse."""
    cuda = torch.device("cuda", 0)
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p).to(cuda), p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = mode.from_tensor(b).to(cuda)
    return module


@contextlib.contextmanager
def h100() -> Iterator[None]:
    """What the code asks the CUDA driver, answered as an H100 would (CUDA autocast then runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
        mp.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
        mp.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA H100 80GB HBM3 (fake)")
        yield


@torch.no_grad()
def backward(root: torch.Tensor) -> None:
    """``root.backward()`` for a scalar ``root``, node by node (see the module's docstring)."""
    start = root.grad_fn
    assert start is not None, "backward of a tensor without a graph"
    pending: dict[int, int] = defaultdict(int)  # node → edges into it not yet processed
    seen: set[int] = set()
    stack, alive = [start], []
    while stack:
        node = stack.pop()
        alive.append(node)  # keeps each node's Python wrapper, so its id stays its own for the pass
        if id(node) in seen:
            continue
        seen.add(id(node))
        for nxt, _ in node.next_functions:
            if nxt is not None:
                pending[id(nxt)] += 1
                stack.append(nxt)
    grads: dict[int, dict[int, torch.Tensor]] = {id(start): {0: torch.ones_like(root)}}
    ready = [start]
    while ready:
        node = ready.pop()
        got = grads.pop(id(node), {})
        args = []
        for i, meta in enumerate(node._input_metadata):
            g = got.get(i)
            if g is None:
                g = torch.zeros(meta.shape, dtype=meta.dtype, device=meta.device)
            else:  # as the engine's validate_outputs: reduce a broadcast gradient, cast to the input's dtype
                if tuple(g.shape) != tuple(meta.shape):
                    g = g.sum_to_size(meta.shape)
                if g.dtype != meta.dtype:
                    g = g.to(meta.dtype)
            args.append(g)
        if callable(node):  # a built-in node: a gradient per edge
            outs = node(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            pairs = list(zip(node.next_functions, outs, strict=True))
        else:  # a custom Function: a gradient per forward input; those needing one map onto the edges
            outs = node.apply(*args)
            outs = outs if isinstance(outs, tuple) else (outs,)
            edges = [e for e in node.next_functions if e[0] is not None]
            wanted = [g for g, need in zip(outs, node.needs_input_grad, strict=False) if need]
            assert len(edges) == len(wanted), (node.name(), len(edges), len(wanted))
            pairs = list(zip(edges, wanted, strict=True))
        for (nxt, nr), g in pairs:
            if nxt is None:
                continue
            if g is not None:
                slot = grads.setdefault(id(nxt), {})
                slot[nr] = g if nr not in slot else slot[nr] + g
            pending[id(nxt)] -= 1
            if pending[id(nxt)] == 0:
                ready.append(nxt)
