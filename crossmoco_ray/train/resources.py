"""Joining or starting Ray, and checking that a run fits the cluster before it starts.

One code path: with ``--address``, ``RAY_ADDRESS`` or under ``ray job submit`` it joins the cluster; else it
starts a local Ray sized for the run. On a 2-core machine, workers at 1 CPU each would leave Ray Data nothing
and the run would hang (ENVIRONMENT.md), so a local run that does not fit fails with the fix; on a cluster,
which an autoscaler may grow, it only warns.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError

# Quiet, offline, and fast on small machines; set before Ray starts so every process inherits them.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).resolve().parents[1] / "ray_data_logging.yaml"),
}
# Passed on to the Train workers when the driver has them (code version, a test's fault injection).
FORWARDED_ENV = ("CROSSMOCO_GIT_COMMIT", "CROSSMOCO_FAULT_AT_STEP")


def worker_env() -> dict[str, str]:
    """Environment variables of every Train worker."""
    env = {k: os.environ.get(k, v) for k, v in RAY_ENV.items()}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return env


def check_resources(
    cfg: Config | Any, resources: dict[str, float], local: bool, log: Callable[[str], None]
) -> None:
    """Workers plus the CPUs kept for Ray Data must fit, or the run would wait (or hang) forever.

    ``cfg``: a pretraining :class:`Config`, or any config whose ``train`` section has ``num_workers``,
    ``cpus_per_worker``, ``gpus_per_worker`` and ``use_gpu`` (fine-tuning's, which keeps no Ray Data CPUs).
    """
    t = cfg.train
    data_cpus = getattr(t, "data_cpus", 0.0)
    cpus_needed = t.num_workers * t.cpus_per_worker + data_cpus
    gpus_needed = t.num_workers * t.gpus_per_worker if t.use_gpu else 0.0
    problems = []
    if resources.get("CPU", 0.0) + 1e-9 < cpus_needed:
        problems.append(
            f"{t.num_workers} workers × {t.cpus_per_worker} CPU + {data_cpus} CPU for Ray Data = "
            f"{cpus_needed:g} CPUs, the cluster has {resources.get('CPU', 0):g}: lower train.cpus_per_worker "
            "(fractions work, e.g. 0.5), train.num_workers or train.data_cpus"
        )
    if gpus_needed > resources.get("GPU", 0.0) + 1e-9:
        problems.append(
            f"{t.num_workers} workers × {t.gpus_per_worker} GPU = {gpus_needed:g} GPUs, the cluster has "
            f"{resources.get('GPU', 0):g}: lower train.num_workers or set train.use_gpu=false"
        )
    if problems:
        if local:
            raise ConfigError("\n".join(problems))
        for p in problems:  # an autoscaling cluster may still add nodes
            log(f"warning: {p} (waiting for the autoscaler)")


def init_ray(
    cfg: Config | Any, address: str | None, log: Callable[[str], None], extra_cpus: float = 0.0
) -> bool:
    """Join a cluster (``address``, ``RAY_ADDRESS``, ``ray job submit``) or start a local Ray (→ True);
    ``cfg`` as for :func:`check_resources`."""
    import ray

    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log(f"joining the Ray cluster at {address}")
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    t = cfg.train
    needed = t.num_workers * t.cpus_per_worker + getattr(t, "data_cpus", 0.0) + extra_cpus
    cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    log(f"starting a local Ray with {cpus} CPUs")
    # The dashboard (on loopback) gives the State API that Ray Train's placement-group cleanup needs.
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    return True
