"""Small C libraries built at first use by the system's compiler and loaded with :mod:`ctypes`.

A :class:`NativeLibrary` names one C source of a package (``crossmoco_ray.nn``'s ``_knn.c``, the mesh
renderer's ``_raster.c``). The C files have no Python or torch headers, so they build in well under a second
with ``cc -O3 -march=native``; ctypes releases the GIL during a call, so threads can share the work.

The library is cached under ``$CROSSMOCO_CACHE`` (default ``~/.cache/crossmoco-ray``) in ``kernels/``,
named ``<name>-<key>.so`` with the key computed from the source, the compiler and the CPU's model and flags,
so nodes of different CPU types that share a home directory each get their own build. That key can be
computed by anyone, so a cached library is loaded only if no other user could have written it: a regular
file (not a link) of the current user that nobody else may write (a user private group aside), in a
directory chain that nobody else may change, matching the SHA-256 recorded beside it when it was built
(``.so.sha256``). A bad file in a safe cache is rebuilt in place; a cache others can write to is left alone
and the library is built in a private temporary directory (one warning naming the path and the reason,
either way). Those checks are in :mod:`crossmoco_ray.nn.trusted_files`.

Without a compiler, if the build fails or if the library lacks a function, :meth:`NativeLibrary.load`
returns ``None`` and warns once per process; its caller runs its fallback. An environment variable
(``CROSSMOCO_KNN=torch``, ``CROSSMOCO_RASTER=numpy``) forces the fallback, without a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from crossmoco_ray.nn.cpu import cpu_flags, cpu_name
from crossmoco_ray.nn.trusted_files import Untrusted, digest_path, dir_problem, verify_recorded

logger = logging.getLogger(__name__)

MAX_LIBRARY_BYTES = 64 << 20


def cache_dir() -> Path:
    root = os.environ.get("CROSSMOCO_CACHE")
    if root:
        return Path(root).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "crossmoco-ray" / "kernels"


def compiler() -> list[str] | None:
    """The C compiler to use: ``$CC``, Python's own, ``cc``, ``gcc`` or ``clang``; ``None`` if none is."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        if candidate:
            argv = shlex.split(str(candidate))
            if argv and shutil.which(argv[0]):
                return argv
    return None


def library_name(name: str, cc: list[str], src: Path) -> str:
    """``<name>-<key>.so``, keyed by the source, the compiler and the CPU's model and flags."""
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, check=False).stdout
    parts = [src.read_text(), shlex.join(cc), version, cpu_name(), *sorted(cpu_flags())]
    return f"{name}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compile_library(
    cc: list[str], src: Path, out: Path, archs: tuple[list[str], ...] = (["-march=native"], [])
) -> str | None:
    """Build ``out`` with the first of ``archs`` that compiles, and record its SHA-256 beside it; ``None``
    on success, else the complaints.

    ``-march=native`` first (the vector code); a compiler that does not know it gets a portable build.
    ``-std=c11`` (not GNU C) also keeps the compiler from fusing multiplies and adds, so floating-point
    results are those of the source's operations as written. Both files are written under temporary names,
    synced and renamed into place, so a reader never sees half a file.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    errors = []
    try:
        for arch in archs:
            cmd = [*cc, "-O3", *arch, "-std=c11", "-fPIC", "-shared", "-o", tmp, str(src)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                os.chmod(tmp, 0o755)  # the linker's mode follows the umask, which may let the group write
                with open(tmp, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                    os.fsync(f.fileno())
                os.replace(tmp, out)
                record = digest_path(out)
                dfd, dtmp = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
                try:
                    with os.fdopen(dfd, "wb") as f:
                        f.write(f"{digest}  {out.name}\n".encode())
                        f.flush()
                        os.fchmod(f.fileno(), 0o644)
                        os.fsync(f.fileno())
                    os.replace(dtmp, record)
                except BaseException:
                    Path(dtmp).unlink(missing_ok=True)
                    raise
                _sync_dir(out.parent)
                return None
            errors.append(f"{shlex.join(cmd)}: {done.stderr.strip()[-500:]}")
    finally:
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


def open_library(so: Path) -> ctypes.CDLL:
    """Load ``so`` if it and the SHA-256 recorded beside it at build time pass
    :func:`~crossmoco_ray.nn.trusted_files.verify_recorded`; raises :class:`Untrusted` otherwise.

    ``so`` lies in a directory that passed :func:`~crossmoco_ray.nn.trusted_files.dir_problem`, so once
    checked only its owner can change it, and it is loaded by its path. (Not through the checked descriptor,
    ``/proc/self/fd/N``: the dynamic loader knows libraries by name and would hand back an earlier one opened
    under the same number.)
    """
    verify_recorded(so, MAX_LIBRARY_BYTES)
    return ctypes.CDLL(str(so))


@contextmanager
def _dir_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``directory``: processes building the same library take turns."""
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock (a concurrent build still installs whole files)
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass
class NativeLibrary:
    """One C source of a package, built, checked and loaded once per process (:meth:`load`).

    Attributes:
        package: the package that holds the source (``"crossmoco_ray.nn"``).
        source: its file name there (``"_knn.c"``); list it in pyproject's package data.
        name: the library's file-name prefix in the cache (``"knn"``).
        what: what it is, for warnings (``"kNN kernels"``).
        fallback: what runs instead when it does not load, for the warning.
        bind: declares the C functions' signatures on the loaded library; an ``AttributeError`` (a missing
            function) counts as a failed load.
        force_env, force_value: the environment variable and value that force the fallback.
        plural: whether ``what`` is plural ("the compiled kNN kernels are unavailable").
    """

    package: str
    source: str
    name: str
    what: str
    fallback: str
    bind: Callable[[ctypes.CDLL], object]
    force_env: str
    force_value: str
    plural: bool = True
    # "lib": the CDLL, or None once tried; "why", "where": why not, where from; "pool": (threads, executor)
    state: dict[str, object] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:  # a forked child has none of the parent's pool threads, maybe a held lock
        self.lock = threading.Lock()
        self.state.pop("pool", None)

    def forced_off(self) -> bool:
        return os.environ.get(self.force_env, "").lower() == self.force_value

    def load(self) -> ctypes.CDLL | None:
        """The library (built and checked at the first call), or ``None``: forced off, or it cannot be had
        (one warning per process saying why)."""
        if self.forced_off():
            return None
        with self.lock:
            if "lib" in self.state:
                return self.state["lib"]  # type: ignore[return-value]
            lib, where, why = None, "", ""
            try:
                cc = compiler()
                if cc is None:
                    why = "no C compiler found (set CC, or install gcc or clang)"
                else:
                    with resources.as_file(resources.files(self.package).joinpath(self.source)) as src:
                        lib, where, why = self._build_and_load(cc, src)
                if lib is not None:
                    self.bind(lib)
            except (OSError, Untrusted) as err:  # a library that does not load, or fails its checks
                lib, why = None, str(err)[-500:]
            except AttributeError as err:  # a library without one of the functions
                lib, why = None, f"{where} lacks a kernel function ({str(err)[-300:]})"
            if lib is not None:
                logger.debug("compiled %s: %s", self.what, where)
            else:
                verb = "are" if self.plural else "is"
                warnings.warn(
                    f"crossmoco: the compiled {self.what} {verb} unavailable ({why}); {self.fallback}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            self.state["lib"], self.state["why"], self.state["where"] = lib, why, where
            return lib

    def _untrusted_warning(self, path: Path, reason: str, action: str) -> None:
        warnings.warn(
            f"crossmoco: not loading the {self.what} from {path}: {reason}; {action}", RuntimeWarning, 5
        )

    def _build_and_load(self, cc: list[str], src: Path) -> tuple[ctypes.CDLL | None, str, str]:
        """``(library, where it came from, why not)``: the cached build if it can be trusted, else a fresh
        one.

        The cache is shared by processes (and maybe users), and the key of a library is computable from
        public inputs, so a file there is loaded only if its directory and itself are safe from other users
        and it matches the SHA-256 recorded when it was built. A bad file in a safe cache is rebuilt in
        place; a cache that another user could write to is not used: the library is built in a private
        temporary directory.
        """
        name = library_name(self.name, cc, src)
        cache = cache_dir()
        try:
            for missing in reversed([d for d in (cache, *cache.parents) if not d.exists()]):
                missing.mkdir(mode=0o700, exist_ok=True)  # each its user's alone, whatever the umask
            cache = Path(os.path.realpath(cache))  # from here on, no link on the way can be swapped
            problem = dir_problem(cache)
            if problem is None:
                with _dir_lock(cache):
                    so = cache / name
                    if os.path.lexists(so):
                        try:
                            return open_library(so), str(so), ""
                        except Untrusted as err:
                            self._untrusted_warning(so, str(err), "rebuilding it")
                    why = compile_library(cc, src, so)
                    return (open_library(so), str(so), "") if why is None else (None, "", why)
        except OSError as err:  # an unwritable or missing cache
            problem = f"it cannot be used ({err.strerror or err})"
        self._untrusted_warning(cache, problem, "building a private copy")
        with tempfile.TemporaryDirectory(prefix=f"crossmoco-{self.name}-") as private:  # 0700, this process's
            so = Path(private) / name
            why = compile_library(cc, src, so)
            # loaded, then removed with its directory: the process keeps its mapping
            return (open_library(so), f"{so} (private, removed)", "") if why is None else (None, "", why)

    def status(self) -> dict[str, str | bool]:
        """What a bug report needs: the compiler, the cache, whether the library loads (building it if need
        be) and, if not, why."""
        lib = self.load()
        cc = compiler()
        forced = f"{self.force_env}={self.force_value}"
        return {
            "compiler": shlex.join(cc) if cc else "none",
            "cache": str(cache_dir()),
            "loaded": lib is not None,
            "library": str(self.state.get("where") or "") if lib is not None else "",
            "why_not": "" if lib is not None else str(self.state.get("why") or forced),
        }

    def executor(self, threads: int) -> ThreadPoolExecutor:
        """A pool of ``threads`` threads for calls into the library, kept while the count stays the same."""
        with self.lock:
            have = self.state.get("pool")
            if not isinstance(have, tuple) or have[0] != threads:
                if isinstance(have, tuple):
                    have[1].shutdown(wait=False)  # the thread count changed
                have = (threads, ThreadPoolExecutor(threads, thread_name_prefix=f"crossmoco-{self.name}"))
                self.state["pool"] = have
            return have[1]
