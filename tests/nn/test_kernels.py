"""The compiled kNN top-k selects what torch.topk does; without a compiler the kNN falls back, and says so."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from crossmoco_ray.nn import kernels, native, trusted_files
from crossmoco_ray.nn.graph import knn

needs_kernel = pytest.mark.skipif(
    not kernels.available(), reason="no C compiler here: the kNN runs on torch.topk (tested elsewhere)"
)


def top_values(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The selected scores, largest first (index choice among equal scores is free)."""
    return scores.gather(-1, idx).sort(-1, descending=True).values


def assert_valid(idx: torch.Tensor, n: int) -> None:
    assert idx.dtype == torch.int64
    assert bool(((idx >= 0) & (idx < n)).all())
    assert all(len(set(row.tolist())) == idx.shape[-1] for row in idx.reshape(-1, idx.shape[-1]))


@needs_kernel
@pytest.mark.parametrize(
    ("n", "k"), [(n, k) for n in (1, 15, 16, 63, 64, 65, 200, 1024) for k in (1, 5, 20) if k <= n]
)
def test_topk_rows_equals_torch(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 100 + k)
    rows = [
        torch.randn(5, n, generator=g),  # generic
        torch.zeros(2, n),  # every score tied
        torch.randint(0, 3, (3, n), generator=g).float(),  # many ties
        torch.arange(n, dtype=torch.float32).repeat(2, 1),  # ascending: every score enters the heap
        -torch.arange(n, dtype=torch.float32).repeat(2, 1),  # the best come first
    ]
    scores = torch.cat(rows)
    for ordered in (False, True):
        idx = kernels.topk_rows(scores, k, ordered)
        assert_valid(idx, n)
        want = scores.topk(k, dim=-1).values
        assert torch.equal(top_values(scores, idx), want)
        if ordered:
            assert torch.equal(scores.gather(-1, idx), want)


@needs_kernel
def test_ties_keep_the_earlier_index_and_nan_is_safe() -> None:
    scores = torch.zeros(1, 100)
    assert sorted(kernels.topk_rows(scores, 7, False)[0].tolist()) == list(range(7))
    nan = torch.randn(3, 130)
    nan[0, 0] = float("nan")
    nan[1] = float("nan")
    nan[2, ::3] = float("nan")
    assert_valid(kernels.topk_rows(nan, 9, True), 130)


@needs_kernel
@pytest.mark.parametrize(("B", "N", "C"), [(2, 1, 3), (3, 37, 3), (2, 130, 64), (1, 300, 129), (2, 1024, 3)])
@pytest.mark.parametrize("ordered", [False, True])
def test_knn_kernel_matches_torch_path(B: int, N: int, C: int, ordered: bool, monkeypatch) -> None:
    torch.manual_seed(N + C)
    x = torch.randn(B, N, C)
    k = min(N, 20)
    fast = knn(x, k, ordered=ordered)
    monkeypatch.setattr(kernels, "max_k", lambda: 0)  # the torch path: chunked scores and torch.topk
    slow = knn(x, k, ordered=ordered, max_elements=N * N)
    assert_valid(fast, N)
    d = -torch.cdist(x.double(), x.double()).pow(2)  # the exact distances
    got, want = top_values(d, fast), top_values(d, slow)
    assert torch.allclose(got, want, atol=1e-4 * float(d.abs().max()))
    if ordered:  # nearest first: the point itself, then increasing distance
        assert torch.equal(fast[..., 0], torch.arange(N).expand(B, N))
        assert bool((d.gather(-1, fast).diff(dim=-1) <= 1e-4 * float(d.abs().max())).all())


@needs_kernel
def test_knn_runs_on_the_kernel_under_autocast_and_threads() -> None:
    x = torch.randn(4, 257, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = knn(x, 10, ordered=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = knn(x, 10, ordered=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)  # fp32 distances either way, and the row split does not change the result


def run_fresh(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the kernel is loaded once per process)."""
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


PROBE = (
    "import torch; from crossmoco_ray.nn import kernels; from crossmoco_ray.nn.graph import knn; "
    "print('available', kernels.available()); print(tuple(knn(torch.randn(2, 50, 3), 5).shape))"
)


def test_without_a_compiler_knn_falls_back_with_one_warning(tmp_path: Path) -> None:
    done = run_fresh({"CC": "false", "PATH": "/nonexistent", "CROSSMOCO_CACHE": str(tmp_path)}, PROBE)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "(2, 50, 5)" in done.stdout
    assert done.stderr.count("compiled kNN kernels are unavailable") == 1
    assert "no C compiler found" in done.stderr


def test_a_failing_compiler_is_reported_and_falls_back(tmp_path: Path) -> None:
    done = run_fresh({"CC": "false", "CROSSMOCO_CACHE": str(tmp_path)}, PROBE)  # /bin/false fails any build
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "(2, 50, 5)" in done.stdout
    assert "compiled kNN kernels are unavailable" in done.stderr
    assert "-march=native" in done.stderr


def test_forced_fallback(tmp_path: Path) -> None:
    done = run_fresh({"CROSSMOCO_KNN": "torch", "CROSSMOCO_CACHE": str(tmp_path)}, PROBE)
    assert done.returncode == 0, done.stderr
    assert "available False" in done.stdout
    assert "unavailable" not in done.stderr
    assert not (tmp_path / "kernels").exists()


@needs_kernel
def test_build_is_cached_per_machine(tmp_path: Path) -> None:
    env = {"CROSSMOCO_CACHE": str(tmp_path)}
    first = run_fresh(env, PROBE)
    assert first.returncode == 0, first.stderr
    assert "available True" in first.stdout
    built = sorted((tmp_path / "kernels").glob("knn-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    again = run_fresh(env, PROBE)
    assert "available True" in again.stdout
    assert built[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert "not loading" not in first.stderr + again.stderr  # its own build, trusted
    names = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert names == [built[0].name, built[0].name + ".sha256"]  # the digest beside it, no temporaries left


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize(("rows", "k", "o"), [(1, 1, 1), (37, 5, 3), (200, 20, 64), (64, 256, 17)])
def test_neighbour_max_and_its_backward_equal_dense(dtype: torch.dtype, rows: int, k: int, o: int) -> None:
    g = torch.Generator().manual_seed(rows + k + o)
    a = torch.randn(rows, o, generator=g).to(dtype)
    a[rows // 2 :] = a[0].clone()  # exact ties between neighbours
    cols = torch.randint(0, rows, (rows * k,), generator=g)
    gathered = a[cols].view(rows, k, o)
    values, arg = kernels.neighbour_max(a, cols, k, with_arg=True)
    assert arg is not None
    assert arg.dtype == torch.uint8
    assert torch.equal(values, gathered.amax(1))
    assert torch.equal(kernels.neighbour_max(a, cols, k, with_arg=False)[0], values)
    wide = torch.cat((a, torch.randn(rows, 5, generator=g).to(dtype)), dim=1)  # a column slice: strided rows
    strided, strided_arg = kernels.neighbour_max(wide[:, :o], cols, k, with_arg=True)
    assert torch.equal(strided, values)
    assert strided_arg is not None
    assert torch.equal(strided_arg, arg)
    # the arg-max is the first neighbour holding the max
    first = (gathered == values.unsqueeze(1)).to(torch.uint8).argmax(1)
    assert torch.equal(arg.long(), first)
    if dtype == torch.bfloat16:
        return
    grad = torch.randn(rows, o, generator=g).to(dtype)
    want = torch.zeros_like(a).index_put_(
        (cols.view(rows, k).gather(1, first), torch.arange(o).expand(rows, o)), grad, accumulate=True
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5  # sums of the same terms, maybe in another order
    torch.testing.assert_close(kernels.neighbour_max_backward(grad, cols, arg, k), want, rtol=tol, atol=tol)


@needs_kernel
@pytest.mark.parametrize("arch", ["avx2", "portable"])
def test_the_avx2_and_portable_builds_select_alike(arch: str, tmp_path: Path, monkeypatch) -> None:
    """CI machines have AVX-512: the kernel's AVX2 and plain-C branches are built and checked here too."""
    import ctypes
    from importlib import resources

    from crossmoco_ray.nn.precision import cpu_flags

    if arch == "avx2" and not {"avx2", "fma"} <= cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    cc = native.compiler()
    assert cc is not None
    so = tmp_path / f"knn-{arch}.so"
    with resources.as_file(resources.files("crossmoco_ray.nn").joinpath("_knn.c")) as src:
        archs = (["-mavx2", "-mfma"] if arch == "avx2" else [],)
        assert native.compile_library(cc, src, so, archs=archs) is None
    monkeypatch.setitem(kernels._state, "lib", kernels._bind(ctypes.CDLL(str(so))))
    torch.manual_seed(7)
    scores = torch.cat([torch.randn(6, 333), torch.zeros(1, 333), torch.arange(333.0).unsqueeze(0)])
    assert torch.equal(scores.gather(1, kernels.topk_rows(scores, 9, True)), scores.topk(9, -1).values)
    x = torch.randn(2, 300, 64)
    d = -torch.cdist(x.double(), x.double()).pow(2)
    fast = knn(x, 16, ordered=True)
    assert torch.allclose(d.gather(-1, fast), d.topk(16, -1).values, atol=1e-4 * float(d.abs().max()))
    a = torch.randn(120, 19, dtype=torch.float64)
    cols = torch.randint(0, 120, (120 * 7,))
    values, arg = kernels.neighbour_max(a, cols, 7, with_arg=True)
    assert arg is not None
    assert torch.equal(values, a[cols].view(120, 7, 19).amax(1))


# --------------------------------------------------------------------------------------------------
# The cache is shared and the library's name is computable: only a library nobody else could have
# written is loaded.
# --------------------------------------------------------------------------------------------------

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran", f); fclose(f); }
}
int not_a_kernel(void) { return 0; }
"""


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch) -> Path:
    """The next kernel use in this process loads from scratch, with its cache under ``tmp_path``; returns
    the path the library of this machine has there (learnt from a build in another directory)."""
    monkeypatch.delenv("CROSSMOCO_KNN", raising=False)
    for key in ("lib", "why", "where"):
        monkeypatch.delitem(kernels._state, key, raising=False)
    monkeypatch.setenv("CROSSMOCO_CACHE", str(tmp_path / "probe"))
    assert kernels.available()
    (name,) = (p.name for p in (tmp_path / "probe" / "kernels").glob("knn-*.so"))
    monkeypatch.setenv("CROSSMOCO_CACHE", str(tmp_path / "cache"))
    del kernels._state["lib"]
    return tmp_path / "cache" / "kernels" / name


def plant(at: Path, marker: Path) -> Path:
    """A library at ``at`` whose load writes ``marker``, with a correct digest beside it."""
    cc = native.compiler()
    assert cc is not None
    src = at.parent / "planted.c"
    at.parent.mkdir(parents=True, exist_ok=True)
    src.write_text(PLANTED)
    subprocess.run([*cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(at), str(src)], check=True)
    src.unlink()
    os.chmod(at, 0o755)
    record(at)
    return at


def record(so: Path, digest: str | None = None) -> None:
    import hashlib

    digest = digest or hashlib.sha256(so.read_bytes()).hexdigest()
    (so.parent / (so.name + ".sha256")).write_text(f"{digest}  {so.name}\n")


def load_warnings() -> tuple[bool, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = kernels.available()
    return ok, [str(w.message) for w in caught]


def assert_own_build(so: Path) -> None:
    """``so`` is this package's build now, with its digest: the cache was healed."""
    assert so.is_file()
    assert not so.is_symlink()
    assert so.stat().st_uid == os.geteuid()
    assert kernels.open_library(so).knn_max_k() > 0


FOREIGN_UID = 65534  # nobody


def grant_write_by_acl(path: Path, uid: int = FOREIGN_UID) -> None:
    """What `setfacl -m u:UID:rw PATH` does (a named-user entry and a mask; `ls -l` shows mode 0664)."""
    none = 0xFFFFFFFF
    entries = [(0x01, 6, none), (0x02, 6, uid), (0x04, 4, none), (0x10, 6, none), (0x20, 4, none)]
    blob = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, "system.posix_acl_access", blob, follow_symlinks=False)
    except OSError as err:
        pytest.skip(f"no POSIX ACLs on this filesystem ({err.strerror})")


@needs_kernel
@pytest.mark.parametrize(
    "kind",
    ["foreign owner", "shared group", "world-writable", "acl", "symlink", "digest mismatch", "no digest"],
)
def test_a_planted_library_is_never_loaded(kind: str, fresh: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    if kind == "foreign owner":
        if os.geteuid() != 0:
            pytest.skip("chown needs root (the mode and link plants run everywhere)")
        os.chown(plant(fresh, marker), FOREIGN_UID, FOREIGN_UID)
    elif kind == "shared group":
        if os.geteuid() != 0:
            pytest.skip("chgrp to a group of others needs root")
        os.chown(plant(fresh, marker), os.geteuid(), FOREIGN_UID)
        os.chmod(fresh, 0o775)
    elif kind == "world-writable":
        os.chmod(plant(fresh, marker), 0o777)
    elif kind == "acl":  # mode bits that look private (0664, the user's group), an ACL that is not
        grant_write_by_acl(plant(fresh, marker))
    elif kind == "symlink":  # a link to a library elsewhere, its digest beside the link
        target = plant(tmp_path / "elsewhere" / "lib.so", marker)
        fresh.parent.mkdir(parents=True)
        fresh.symlink_to(target)
        record(fresh, (target.parent / "lib.so.sha256").read_text().split()[0])
    elif kind == "digest mismatch":
        record(plant(fresh, marker), "0" * 64)
    else:
        plant(fresh, marker)
        (fresh.parent / (fresh.name + ".sha256")).unlink()
    ok, said = load_warnings()
    assert not marker.exists(), "the planted library was loaded"
    assert ok  # rebuilt in place: the cache directory itself is safe
    reason = {
        "foreign owner": f"belongs to uid {FOREIGN_UID}",
        "shared group": f"writable by group {FOREIGN_UID} (mode 775)",
        "world-writable": "writable by others (mode 777)",
        "acl": f"writable by user {FOREIGN_UID} through an ACL",
        "symlink": "is a symbolic link",
        "digest mismatch": "SHA-256 differs",
        "no digest": ".sha256 is missing",
    }[kind]
    assert [m for m in said if str(fresh) in m and reason in m and "rebuilding it" in m], said
    assert_own_build(fresh)
    assert not marker.exists()


@needs_kernel
@pytest.mark.parametrize("where", ["cache", "parent"])
def test_a_cache_others_can_write_to_is_not_used(where: str, fresh: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant(fresh, marker)  # a library that would pass every check of the file itself
    unsafe = fresh.parent if where == "cache" else fresh.parent.parent
    os.chmod(unsafe, 0o777)
    ok, said = load_warnings()
    assert not marker.exists(), "the planted library was loaded"
    assert ok  # built and loaded privately
    assert [m for m in said if f"{unsafe} is writable by others" in m and "private copy" in m], said
    assert "private" in str(kernels.status()["library"])
    assert (fresh.parent / (fresh.name + ".sha256")).exists()  # the cache was left alone


@needs_kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="chgrp to a group of others needs root")
def test_a_cache_a_shared_group_can_write_to_is_not_used(fresh: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant(fresh, marker)
    os.chown(fresh.parent, os.geteuid(), FOREIGN_UID)
    os.chmod(fresh.parent, 0o775)
    ok, said = load_warnings()
    assert not marker.exists(), "the planted library was loaded"
    assert ok
    assert [m for m in said if f"writable by group {FOREIGN_UID}" in m and "private copy" in m], said


@needs_kernel
@pytest.mark.skipif(not trusted_files.private_group(os.getegid()), reason="no user private group here")
def test_write_by_your_private_group_is_accepted(fresh: Path) -> None:
    """What umask 002 leaves on Debian and Ubuntu: the group is the user alone."""
    assert kernels.available()
    for path in (fresh.parent, fresh, fresh.parent / (fresh.name + ".sha256")):
        os.chown(path, os.geteuid(), os.getegid())
        os.chmod(path, path.stat().st_mode | 0o020)
    del kernels._state["lib"]
    ok, said = load_warnings()
    assert ok
    assert not [m for m in said if "not loading" in m], said
    assert kernels.status()["library"] == str(fresh)


@needs_kernel
def test_a_sticky_parent_like_tmp_is_fine(fresh: Path) -> None:
    fresh.parent.mkdir(parents=True)
    os.chmod(fresh.parent.parent, 0o1777)  # others may add entries but not move ours
    ok, said = load_warnings()
    assert ok
    assert not [m for m in said if "not loading" in m], said
    assert kernels.status()["library"] == str(fresh)


@needs_kernel
def test_a_library_without_the_kernels_falls_back(fresh: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant(fresh, marker)  # trusted (ours, private, its digest) but not our kernels
    ok, said = load_warnings()
    assert marker.exists()  # it was trusted and loaded ...
    assert not ok  # ... and its missing functions send the kNN to torch, not to an AttributeError
    assert [m for m in said if "lacks a kernel function" in m and "unavailable" in m], said
    assert tuple(knn(torch.randn(2, 30, 3), 4).shape) == (2, 30, 4)


@needs_kernel
def test_a_build_under_a_group_umask_is_private(fresh: Path) -> None:
    old = os.umask(0o002)  # the default of distributions with a group per user
    try:
        ok, said = load_warnings()
    finally:
        os.umask(old)
    assert ok, said
    assert not fresh.stat().st_mode & 0o022
    assert not (fresh.parent / (fresh.name + ".sha256")).stat().st_mode & 0o022
    assert not fresh.parent.stat().st_mode & 0o077  # the cache directory it made is the user's alone
