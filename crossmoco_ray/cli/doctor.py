"""``crossmoco doctor``: what a bug report needs about this machine and install, as
``python -m torch.utils.collect_env`` gives it for torch.

Versions (this package and its commit, Python, torch with its CUDA, cuDNN and NCCL, Ray, MLflow, the
data libraries), the CPU and its bf16 instructions, every GPU with its compute capability, memory and
whether it computes bf16 natively, the NVIDIA driver, the compiled CPU kernels (compiler, cache, whether
they load), the environment variables that change how a run behaves, and, when connected to a Ray
cluster (``--address`` or ``RAY_ADDRESS``), its nodes, resources and GPU types. It never starts a Ray
of its own, and prints no secret (tokens and passwords are named, their values left out; credentials and
query strings in URIs are hidden).

Also the command's parser and handler (:func:`add_doctor_parser`, registered on the top-level parser by
:func:`crossmoco_ray.cli.main.build_parser`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from importlib import metadata
from typing import Any

from crossmoco_ray.cli.common import add_command

PACKAGES = (
    "torch", "torchvision", "ray", "mlflow", "numpy", "pyarrow", "h5py", "trimesh", "pydantic",
    "scikit-learn", "pillow",
)  # fmt: skip
# environment variables that change a run; values of names containing these words are never printed
ENV_PREFIXES = ("CUDA_", "NCCL_", "TORCH_NCCL_", "CUBLAS_", "CROSSMOCO_", "RAY_", "MLFLOW_", "OMP_", "GLOO_")
SECRET_WORDS = ("TOKEN", "PASSWORD", "SECRET", "KEY", "CREDENTIAL")

DOCTOR_EPILOG = """\
examples:
  crossmoco doctor                                  # this machine: paste the output into a bug report
  crossmoco doctor --json > doctor.json
  RAY_ADDRESS=127.0.0.1:6379 crossmoco doctor       # and the Ray cluster it would join

Never starts a Ray of its own; secrets among the environment variables are named, not shown.
"""


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _nvidia_driver() -> str:
    """The NVIDIA driver's version through NVML (Ray's bundled copy), or why it is unknown."""
    try:
        import ray._private.thirdparty.pynvml as nvml
    except ImportError:
        return "unknown (no NVML binding)"
    try:
        nvml.nvmlInit()
        try:
            version = nvml.nvmlSystemGetDriverVersion()
        finally:
            nvml.nvmlShutdown()
    except Exception as err:  # NVMLError_LibraryNotFound on a machine without a driver, ...
        return f"none ({type(err).__name__})"
    return version.decode() if isinstance(version, bytes) else str(version)


def software() -> dict[str, Any]:
    import torch

    from crossmoco_ray import version

    commit, source = version.git_commit()
    cuda_build = torch.version.cuda
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if cuda_build else "n/a (CPU build)"
    except (AttributeError, RuntimeError) as err:
        nccl = f"unavailable ({err})"
    return {
        "crossmoco-ray": version.package_version(),
        "commit": f"{commit} ({source})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "torch CUDA build": cuda_build or "none (CPU build)",
        "cuDNN": _cudnn(torch.backends.cudnn.version()) if cuda_build else "n/a",
        "NCCL": nccl,
    }


def _cudnn(v: int | None) -> str:
    """cuDNN's version number (major·10000 + minor·100 + patch since cuDNN 9) as text."""
    if not v:
        return "unavailable"
    return f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v >= 90000 else str(v)


def hardware() -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from crossmoco_ray.nn.precision import BF16_CPU_FLAGS, cpu_description, cpu_flags, cuda_bf16_support

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            capability = (p.major, p.minor)
            why = cuda_bf16_support(p.name, capability)
            gpus.append(
                {
                    "index": i,
                    "name": p.name,
                    "compute capability": f"{p.major}.{p.minor}",
                    "memory GiB": round(p.total_memory / 2**30, 1),
                    "native bf16": why is None,
                }
            )
    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "cpu native bf16": any(f in cpu_flags() for f in BF16_CPU_FLAGS),
        "cuda available": torch.cuda.is_available(),
        "gpus": gpus,
        "nvidia driver": _nvidia_driver(),
        "distributed backends": {
            "nccl": dist.is_available() and dist.is_nccl_available(),
            "gloo": dist.is_available() and dist.is_gloo_available(),
        },
    }


def kernels() -> dict[str, Any]:
    from crossmoco_ray.nn import kernels as compiled

    return compiled.status()


def environment() -> dict[str, str]:
    """The variables that change how a run behaves; secrets by name only, credentials in URIs hidden."""
    out = {}
    for name in sorted(os.environ):
        if name.startswith(ENV_PREFIXES):
            secret = any(word in name.upper() for word in SECRET_WORDS)
            out[name] = "(set, not shown)" if secret else _without_credentials(os.environ[name])
    return out


def _without_credentials(value: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://***@host/...`` (and query strings dropped)."""
    value = re.sub(r"(\w[\w+.-]*://)[^/@\s]*@", r"\1***@", value)
    return re.sub(r"(\w[\w+.-]*://[^\s?]*)\?\S*", r"\1?***", value)


def cluster(address: str | None) -> dict[str, Any]:
    """The Ray cluster this process is connected to, or joins at ``address`` / ``RAY_ADDRESS``; never a
    new local one."""
    import logging

    import ray

    from crossmoco_ray.runs.resources import EMULATED_BF16_GPUS, gpu_types

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if not address:
            return {
                "connected": False,
                "note": "not connected: give --address or set RAY_ADDRESS to include one",
            }
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    resources = ray.cluster_resources()
    types = gpu_types(resources)
    return {
        "connected": True,
        "ray version": ray.__version__,
        "nodes alive": sum(1 for n in ray.nodes() if n.get("Alive")),
        "resources": {k: v for k, v in sorted(resources.items()) if not k.startswith(("node:", "memory"))},
        "gpu types": types,
        "gpu types without native bf16": [t for t in types if t in EMULATED_BF16_GPUS],
    }


def report(address: str | None = None) -> dict[str, Any]:
    """Everything ``crossmoco doctor`` prints, as a dict."""
    out: dict[str, Any] = {"software": software(), "hardware": hardware(), "kernels": kernels()}
    try:
        out["ray cluster"] = cluster(address)
    except Exception as err:  # a cluster that does not answer is part of the report, not a crash
        out["ray cluster"] = {"connected": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
    out["environment"] = environment()
    return out


def to_text(r: dict[str, Any]) -> str:
    """The report as indented text, ready to paste into an issue."""
    lines: list[str] = []

    def emit(value: Any, indent: int) -> None:
        pad = "  " * indent
        if isinstance(value, dict):
            for k, v in value.items():
                if isinstance(v, (dict, list)) and v:
                    lines.append(f"{pad}{k}:")
                    emit(v, indent + 1)
                else:
                    lines.append(f"{pad}{k}: {_scalar(v)}")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    lines.append(f"{pad}- " + ", ".join(f"{k}: {_scalar(v)}" for k, v in item.items()))
                else:
                    lines.append(f"{pad}- {_scalar(item)}")

    for section, content in r.items():
        lines.append(f"## {section}")
        emit(content, 1)
    return "\n".join(lines)


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v in ({}, [], ""):
        return "none"
    return str(v)


def main(address: str | None, as_json: bool) -> int:
    r = report(address)
    print(json.dumps(r, indent=2, default=str) if as_json else to_text(r))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    return main(args.address, args.json)


def add_doctor_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``doctor`` to the top-level subparsers ``sub``."""
    p = add_command(
        sub,
        "doctor",
        help="versions, GPUs, native bf16, compiled kernels, the Ray cluster: what a bug report needs",
        description="Print what this machine and install are (and the Ray cluster, when connected).",
        epilog=DOCTOR_EPILOG,
    )
    p.add_argument("--address", help="a Ray cluster to describe (default: RAY_ADDRESS, else none)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_doctor)
