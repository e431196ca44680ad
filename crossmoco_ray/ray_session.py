"""Joining a Ray cluster or starting a private local one: the one place that calls ``ray.init``.

With an address (``--address``, ``RAY_ADDRESS``, or under ``ray job submit``) it joins that cluster; else it
starts a Ray of this process that listens on loopback only, with token authentication and session files
only you can read. Pretraining, fine-tuning, searches and ``prepare --ray`` all start Ray here.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

# Quiet, offline, and fast on small machines; set before Ray starts so every process inherits them.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    "RAY_DEDUP_LOGS": "0",
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).resolve().parent / "ray_data_logging.yaml"),
}


def join_or_start(
    address: str | None, cpus: int | None, log: Callable[[str], None], *, dashboard: bool
) -> bool:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``; a Ray already running in this process is kept),
    else start a private local Ray with ``cpus`` CPUs (default: this machine's): → whether it is local."""
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
    cpus = cpus or os.cpu_count() or 1
    log(f"starting a local Ray with {cpus} CPUs")
    start_local_ray(cpus, log, dashboard=dashboard)
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
