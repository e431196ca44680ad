"""Joining or starting Ray, and checking that a run fits the cluster before it starts.

One code path: with ``--address``, ``RAY_ADDRESS`` or under ``ray job submit`` it joins the cluster; else it
starts a local Ray sized for the run. On a 2-core machine, workers at 1 CPU each would leave Ray Data nothing
and the run would hang (ENVIRONMENT.md), so a local run that does not fit fails with the fix; on a cluster,
which an autoscaler may grow, it only warns.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..bounded import clip, short_repr
from ..config import Config, ConfigError
from ..nn.runtime import cuda_bf16_support

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

# Ray's accelerator_type names (the `accelerator_type:<name>` resource of a GPU node) of NVIDIA GPUs that
# emulate bf16 (compute capability below 8.0), with their capability. Names not listed are not judged
# here: the worker checks its own GPU (crossmoco_ray.nn.runtime.bf16_support) and says so.
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
    from ..nn.runtime import CUBLAS_WORKSPACE

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


def _shortfall(t: Any, key: str, amount: float, need: float, have: float, local: bool) -> str:
    """Why the workers' ``key`` does not fit, and the fix."""
    workers = f"{t.num_workers} workers × {amount:g}"
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
            f"train.worker_resources.{key}: {t.num_workers} workers × {amount / gib:.3g} GiB = "
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
    cluster whose GPUs all emulate it (slower than fp32).

    ``cfg``: a pretraining :class:`Config`, or any config whose ``train`` section has ``num_workers``,
    ``cpus_per_worker``, ``gpus_per_worker`` and ``use_gpu`` (fine-tuning's, which keeps no Ray Data CPUs
    and asks for no other resources).
    """
    t = cfg.train
    data_cpus = getattr(t, "data_cpus", 0.0)
    problems = []
    for key, amount in worker_request(t).items():
        need = t.num_workers * amount + (data_cpus if key == "CPU" else 0.0)
        have = float(resources.get(key, 0.0))
        if need > have + 1e-9:
            problems.append(_shortfall(t, key, amount, need, have, local))
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
    """Join a cluster (``address``, ``RAY_ADDRESS``, ``ray job submit``) or start a private local Ray
    (:func:`start_local_ray`, → True); ``cfg`` as for :func:`check_resources`."""
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
    per_worker = worker_request(t)["CPU"]  # train.worker_resources.CPU, where given, as Ray is asked
    needed = t.num_workers * per_worker + getattr(t, "data_cpus", 0.0) + extra_cpus
    cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    log(f"starting a local Ray with {cpus} CPUs")
    # The dashboard gives the State API that Ray Train's placement-group cleanup needs.
    start_local_ray(cpus, log, dashboard=True)
    return True


LOOPBACK = "127.0.0.1"
# Ray 2.60 takes the loopback address as a new node's IP only where this is off (its default on macOS and
# Windows); ``ray.init(_node_ip_address="127.0.0.1")`` is rewritten to the machine's outward address.
_LOOPBACK_NODE_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_TOKEN_FILE_ENV, _TOKEN_ENV, _AUTH_MODE_ENV = "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE"


def start_local_ray(cpus: int, log: Callable[[str], None], *, dashboard: bool) -> None:
    """Start a Ray of this process that nothing off this machine can reach, with token authentication.

    Every server binds to loopback: with the node IP 127.0.0.1, Ray puts its GCS, raylet, object manager,
    workers, dashboard agent, runtime-env agent and metrics export there, and the dashboard (``dashboard``:
    Ray Train's placement-group cleanup needs its State API) is told to. Token authentication keeps other
    users of this machine out of those loopback ports; its token file is readable by you alone
    (:func:`private_token`), and so are Ray's session files (:func:`private_temp_dir`). A Ray that came up
    on another address is shut down again, with the reason.
    """
    import ray
    from ray._private import ray_constants

    private_token(log)
    private_temp_dir(log)
    switch, flag = os.environ.get(_LOOPBACK_NODE_SWITCH), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_LOOPBACK_NODE_SWITCH] = "0"  # for the processes Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # for this one, whose Ray was imported before
    try:
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            logging_level=logging.WARNING,
        )
    finally:  # the node's processes have their environment; a later join of a cluster needs the default
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if switch is None:
            os.environ.pop(_LOOPBACK_NODE_SWITCH, None)
        else:
            os.environ[_LOOPBACK_NODE_SWITCH] = switch
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray came up on {node_ip}, not on {LOOPBACK} (this Ray version chooses its address "
            f"otherwise), so it would listen beyond this machine: stopped. Start a Ray head yourself "
            "(cluster/local_head.sh) and join it with --address"
        )


def private_temp_dir(log: Callable[[str], None]) -> str:
    """Put the local Ray's files (``RAY_TMPDIR``: session, sockets, logs, runtime environments) in a
    directory only you can enter; returns it.

    Ray makes each of those directories writable by everyone (mode 0777, for users sharing one Ray), so
    under the shared ``/tmp/ray`` another user could replace a socket or plant code in a runtime
    environment. Here they go under a fresh ``/tmp/cmr-*`` of mode 0700 (short: Ray's socket paths must fit
    in 107 bytes), which every process of this Ray inherits. A ``RAY_TMPDIR`` you set is kept; if others
    can enter it, that is said.
    """
    given = os.environ.get("RAY_TMPDIR")
    if given:
        try:
            st = os.stat(given)
            shared = st.st_uid != os.geteuid() or bool(st.st_mode & 0o077)
        except OSError:
            shared = False  # Ray creates it (with the umask's mode) and says what fails
        if shared:
            log(
                f"warning: RAY_TMPDIR={given[:200]} is open to other users, and Ray makes its session "
                "directories in it writable by everyone: use a directory of yours with mode 0700"
            )
        return given
    import tempfile

    private = tempfile.mkdtemp(prefix="cmr-", dir="/tmp" if os.path.isdir("/tmp") else None)  # mode 0700
    os.environ["RAY_TMPDIR"] = private
    log(f"Ray's session files and logs: {private}/ray/session_latest")
    return private


def private_token(log: Callable[[str], None]) -> Path | None:
    """Make the token of a local Ray's authentication readable by you alone (its file, returned), before
    Ray starts.

    Ray 2.60 reads the token from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``, and creates the last, when none exists, with the default mode (readable by
    everyone). Here it is created first, mode 0600 in a directory of yours (0700 when made here), holding a
    random 256-bit token as Ray's own; an existing file of yours that others may read is made 0600.
    With ``RAY_AUTH_MODE`` set to anything but ``token``, authentication is off by your choice: said, and
    nothing is done.
    """
    mode = os.environ.get(_AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        log(
            f"warning: {_AUTH_MODE_ENV}={mode[:40]}: the local Ray runs without token authentication, so any "
            "user of this machine can run code through it; unset it to keep authentication on"
        )
        return None
    if os.environ.get(_TOKEN_ENV):
        return None
    path = Path(os.environ.get(_TOKEN_FILE_ENV) or Path.home() / ".ray" / "auth_token")
    if not os.environ.get(_TOKEN_FILE_ENV) and not os.path.lexists(path):
        import secrets

        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        return path
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as err:  # missing (Ray says so), a link: not changed here
        log(f"warning: the Ray token file {path} was left as it is ({err.strerror})")
        return path
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            was = stat.S_IMODE(st.st_mode)
            log(f"made the Ray token file {path} readable by you alone (it was mode {was:o})")
        elif st.st_mode & 0o077:
            log(f"warning: the Ray token file {path} is not yours and others may read it: keep it private")
    finally:
        os.close(fd)
    return path
