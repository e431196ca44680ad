"""Checking that a run fits the cluster before it starts, and what its workers are given.

One code path: with ``--address``, ``RAY_ADDRESS`` or under ``ray job submit`` it joins the cluster; else it
starts a local Ray sized for the run. On a 2-core machine, workers at 1 CPU each would leave Ray Data nothing
and the run would hang (ENVIRONMENT.md), so a local run that does not fit fails with the fix; on a cluster,
which an autoscaler may grow, it only warns.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from crossmoco_ray.bounded import clip, short_repr
from crossmoco_ray.config.schema import Config
from crossmoco_ray.errors import ConfigError
from crossmoco_ray.nn.precision import cuda_bf16_support
from crossmoco_ray.ray_session import RAY_ENV, join_or_start

# Passed on to the Train workers when the driver has them (the code version of a tree without .git).
FORWARDED_ENV = ("CROSSMOCO_GIT_COMMIT",)

# Ray's accelerator_type names (the `accelerator_type:<name>` resource of a GPU node) of NVIDIA GPUs that
# emulate bf16 (compute capability below 8.0), with their capability. Names not listed are not judged
# here: the worker checks its own GPU (crossmoco_ray.nn.precision.bf16_support) and says so.
# (Ray's names: "Tesla V100S-PCIE-32GB" → V100S, "NVIDIA T4G" → T4G, consumer cards by their hyphenated
# name. Left out: "RTX-6000", which Ray gives both the Turing Quadro RTX 6000 and the Ada RTX 6000.)
EMULATED_BF16_GPUS = {
    "K80": (3, 7), "M60": (5, 2), "P4": (6, 1), "P40": (6, 1), "P100": (6, 0), "V100": (7, 0),
    "V100S": (7, 0), "T4": (7, 5), "T4G": (7, 5), "TITAN-V": (7, 0), "TITAN-RTX": (7, 5),
    "GeForce-RTX-2080-Ti": (7, 5), "GeForce-RTX-2080": (7, 5), "GeForce-RTX-2070": (7, 5),
}  # fmt: skip


def worker_env(deterministic: bool = False) -> dict[str, str]:
    """Environment variables of every Train worker (with ``deterministic``, cuBLAS's fixed workspace,
    which must be set before the worker's first CUDA product)."""
    from crossmoco_ray.nn.precision import CUBLAS_WORKSPACE

    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    return env


def gpu_types(resources: dict[str, float]) -> list[str]:
    """The GPU types a Ray cluster advertises (``accelerator_type:<name>`` resources), sorted."""
    prefix = "accelerator_type:"
    return sorted(k[len(prefix) :] for k in resources if k.startswith(prefix))


def emulated_bf16_problem(cfg: Config | Any, resources: dict[str, float]) -> str | None:
    """Why ``train.precision=bf16`` on this cluster's GPUs would be emulated (all its GPU types lack native
    bf16), or ``None``: no GPU run, no bf16, no GPU type known, or one that has it."""
    t = cfg.train
    types = gpu_types(resources)
    if not (t.use_gpu and t.precision == "bf16" and types):
        return None
    if not all(name in EMULATED_BF16_GPUS for name in types):
        return None
    reasons = "; ".join(filter(None, (cuda_bf16_support(n, EMULATED_BF16_GPUS[n]) for n in types)))
    return f"train.precision=bf16 on this cluster's GPUs: {reasons}. Set train.precision=fp32"


def worker_request(t: Any) -> dict[str, float]:
    """The resources Ray is asked for per worker (``resources_per_worker``) by a ``train`` section:
    ``cpus_per_worker`` CPUs, every ``worker_resources`` entry (whose ``CPU`` wins over
    ``cpus_per_worker``), and with ``use_gpu`` ``gpus_per_worker`` GPUs."""
    request = {"CPU": float(t.cpus_per_worker), **getattr(t, "worker_resources", {})}
    if t.use_gpu:
        request["GPU"] = float(t.gpus_per_worker)
    return request


def fewest_workers(t: Any) -> int:
    """The workers a run cannot start without: an elastic run's minimum, else all of them."""
    low = getattr(t, "min_workers", None)
    return int(low) if low is not None and low < t.num_workers else int(t.num_workers)


def _shortfall(t: Any, key: str, amount: float, need: float, have: float, local: bool) -> str:
    """Why the workers' ``key`` does not fit, and the fix."""
    n = fewest_workers(t)
    workers = f"{n} workers{' (the elastic minimum)' if n < t.num_workers else ''} × {amount:g}"
    if key == "CPU":
        data_cpus = getattr(t, "data_cpus", 0.0)
        where = "train.worker_resources.CPU" if "CPU" in getattr(t, "worker_resources", {}) else None
        knob = where or "train.cpus_per_worker (fractions work, e.g. 0.5)"
        return (
            f"{workers} CPU + {data_cpus:g} CPU for Ray Data = {need:g} CPUs, the cluster has {have:g}: "
            f"lower {knob}, train.num_workers or train.data_cpus"
        )
    if key == "GPU":
        return (
            f"{workers} GPU = {need:g} GPUs, the cluster has {have:g}: lower train.num_workers or set "
            "train.use_gpu=false"
        )
    name = short_repr(key, 80)
    if key in ("memory", "object_store_memory"):
        gib = 1 << 30
        return (
            f"train.worker_resources.{key}: {n} workers × {amount / gib:.3g} GiB = "
            f"{need / gib:.3g} GiB, the cluster has {have / gib:.3g} GiB: lower it (Ray counts it in bytes) "
            "or drop it from train.worker_resources"
        )
    # a local Ray started here has only CPU, GPU and memory: a custom resource would be waited for forever
    fix = (
        "a local Ray has no custom resources: drop it from train.worker_resources, or start a Ray with it "
        f"(`ray start --head --resources='{{\"{clip(key, 80)}\": {need:g}}}'`) and join that with "
        "--address or RAY_ADDRESS"
        if local
        else "drop it from train.worker_resources or add nodes that advertise it (`ray start --resources`)"
    )
    return f"train.worker_resources {name}: {workers} = {need:g}, the cluster has {have:g}: {fix}"


def check_resources(
    cfg: Config | Any, resources: dict[str, float], local: bool, log: Callable[[str], None]
) -> None:
    """Every resource the workers ask for, plus the CPUs kept for Ray Data, must fit, or the run would
    wait (or hang) forever: CPUs, GPUs, and each key of ``train.worker_resources`` (memory, custom
    resources), counted as :func:`worker_request` asks Ray for them. Local: a :class:`ConfigError` before
    any worker starts; on a cluster (an autoscaler may add nodes): warnings. And bf16 is refused on a
    cluster whose GPUs all emulate it (slower than fp32). An elastic run (``train.num_workers=[min, max]``)
    needs its minimum to fit; fewer than its maximum is said, not refused (it grows when capacity comes).

    ``cfg``: a pretraining :class:`Config`, or any config whose ``train`` section has ``num_workers``,
    ``cpus_per_worker``, ``gpus_per_worker`` and ``use_gpu`` (fine-tuning's, which keeps no Ray Data CPUs
    and asks for no other resources).
    """
    t = cfg.train
    data_cpus = getattr(t, "data_cpus", 0.0)
    problems = []
    fewest, fits = fewest_workers(t), t.num_workers
    for key, amount in worker_request(t).items():
        extra = data_cpus if key == "CPU" else 0.0
        need = fewest * amount + extra
        have = float(resources.get(key, 0.0))
        if need > have + 1e-9:
            problems.append(_shortfall(t, key, amount, need, have, local))
        elif amount > 0:
            fits = min(fits, int((have - extra + 1e-9) // amount))
    if not problems and fewest < t.num_workers and fits < t.num_workers:
        log(
            f"elastic: the cluster has room for {fits} of train.num_workers=[{fewest}, {t.num_workers}] now; "
            "the run starts with what fits and grows when nodes join"
        )
    bf16 = emulated_bf16_problem(cfg, resources)
    if bf16:  # every GPU the cluster has would emulate it: refused, on a cluster too
        raise ConfigError(bf16)
    if problems:
        if local:
            raise ConfigError("\n".join(problems))
        for p in problems:  # an autoscaling cluster may still add nodes
            log(f"warning: {p} (waiting for the autoscaler)")


def init_ray(
    cfg: Config | Any, address: str | None, log: Callable[[str], None], extra_cpus: float = 0.0
) -> bool:
    """Join a cluster (``address``, ``RAY_ADDRESS``, ``ray job submit``) or start a private local Ray sized
    for the run (→ True); ``cfg`` as for :func:`check_resources`."""
    t = cfg.train
    per_worker = worker_request(t)["CPU"]  # train.worker_resources.CPU, where given, as Ray is asked
    needed = t.num_workers * per_worker + getattr(t, "data_cpus", 0.0) + extra_cpus
    cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    # The dashboard gives the State API that Ray Train's placement-group cleanup needs.
    return join_or_start(address, cpus, log, dashboard=True)
