"""A corpus of damaged and crafted files, read the way ``prepare`` reads them (issue 27).

For every reader format, files that are truncated, random bytes, empty, of the wrong type, whose headers lie,
that hold NaN/Inf, 0 or 1 points, absurd counts or coordinates, that carry names which are not UTF-8, or
that are directories, FIFOs and looping links where files are expected. Read through
:func:`crossmoco_ray.data.sources.formats.open_source` and prepare's per-sample checks, each must give only
:class:`DataError` s that name the file (and the row, inside an h5 file), count what they cost (``rows``),
print on any terminal, and stay short; memory must stay bounded where a file claims far more than it holds.
Any other exception fails the test by propagating.
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tracemalloc
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np
import pytest
import trimesh  # noqa: F401  (imported before any memory is measured: imports are not what is measured)

from crossmoco_ray.data.pipeline.augment import normalize_unit_sphere
from crossmoco_ray.data.prepare.sample_checks import MIN_POINTS, check_label, check_points, check_views
from crossmoco_ray.data.render.splat import RenderSpec
from crossmoco_ray.data.sources.base import MAX_COORDINATE
from crossmoco_ray.data.sources.formats import open_source
from crossmoco_ray.data.sources.ply import write_ply
from crossmoco_ray.data.sources.sample import Sample
from crossmoco_ray.errors import DataError
from tests.data import fixtures

SPEC = RenderSpec(azimuths=(0.0, 180.0), size=16, supersample=1)
MB = 1024**2


def drain(spec: str, **kwargs: object) -> tuple[list[Sample], list[DataError]]:
    """Every item of every task of every split, through prepare's checks: the good samples and the errors."""
    src = open_source(spec, **kwargs)  # type: ignore[arg-type]
    names, hint = src.class_names(), src.label_hint()
    good: list[Sample] = []
    errors: list[DataError] = []
    for split in src.splits():
        src.count(split)
        for task in src.tasks(split):
            for item in src.read_task(split, task):
                try:
                    if isinstance(item, DataError):
                        raise item
                    pts = check_points(item, MIN_POINTS)
                    check_label(item, names, hint)
                    check_views(item, pts, SPEC)
                    good.append(item)
                except DataError as err:
                    # Without its traceback: the frames would keep every failed cloud's arrays alive.
                    errors.append(err.with_traceback(None))
    src.identity()
    for err in errors:
        text = str(err)
        text.encode("utf-8")  # no lone surrogates from undecodable names: prints on any terminal
        assert len(text) < 1200, text
        assert err.rows >= 1
    return good, errors


@contextmanager
def peak_memory(limit: int) -> Iterator[None]:
    """Fail when Python allocations (numpy arrays included) peak above ``limit`` bytes inside the block."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak / MB:.1f} MiB"


def by_file(errors: list[DataError]) -> dict[str, list[DataError]]:
    out: dict[str, list[DataError]] = {}
    for err in errors:
        out.setdefault(Path(err.source).name, []).append(err)
    return out


# ---- HDF5 --------------------------------------------------------------------------------------------------


def h5(path: Path, data: object, label: object = None, **extra: object) -> None:
    with h5py.File(path, "w") as f:
        f["data"] = data
        n = len(data) if hasattr(data, "__len__") else 1  # type: ignore[arg-type]
        f["label"] = np.zeros((n, 1), np.int64) if label is None else label
        for key, value in extra.items():
            f[key] = value


def good_cloud(n: int = 1, points: int = 32) -> np.ndarray:
    return fixtures.clouds(n, points, 5)


def with_row(bad: np.ndarray) -> np.ndarray:
    data = good_cloud(3)
    data[1] = bad
    return data


def h5_valid_half(path: Path) -> None:
    h5(path, good_cloud(200))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def h5_huge_claim(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", (10**9, 4096, 3), "f4", chunks=(1, 4096, 3))
        f.create_dataset("label", (10**9,), "i8", chunks=(4096,))


def h5_label_claim(path: Path) -> None:
    """Real data, but a label dataset of 10^12 rows never written."""
    with h5py.File(path, "w") as f:
        f["data"] = good_cloud(3)
        f.create_dataset("label", (10**12,), "i8", chunks=(4096,))


def h5_huge_chunks(path: Path) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", (3, 2**22, 3), "f4", chunks=(3, 2**22, 3), compression="gzip")
        f["label"] = np.zeros(3, np.int64)


def h5_zip_bomb(path: Path, rows: int = 1600) -> None:
    """75 MiB of zeros in a few hundred KB: read honestly (every stored row is a row), a block at a time."""
    with h5py.File(path, "w") as f:
        d = f.create_dataset("data", (rows, 4096, 3), "f4", chunks=(16, 4096, 3), compression="gzip")
        zeros = np.zeros((16, 4096, 3), np.float32)
        for start in range(0, rows, 16):
            d[start : start + 16] = zeros
        f["label"] = np.zeros(rows, np.int64)


H5_CASES: dict[str, tuple[Callable[[Path], None], str, int, int | None]] = {
    # case: (write train.h5, problem, rows it costs, row index)
    "random-bytes": (
        lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "cannot open HDF5",
        1,
        None,
    ),
    "empty": (lambda p: p.write_bytes(b""), "cannot open HDF5", 1, None),
    "truncated": (h5_valid_half, "cannot open HDF5 file .*truncated", 1, None),
    "huge-claim": (h5_huge_claim, "'data' declares 1000000000 rows .* stores only 0 of its", 10**9, None),
    "label-claim": (h5_label_claim, "'label' has 1000000000000 rows but 'data' has 3", 3, None),
    "huge-chunks": (h5_huge_chunks, "chunks of 144 MiB", 3, None),
    "nan": (lambda p: h5(p, with_row(np.full((32, 3), np.nan, np.float32))), "NaN or Inf at point 0", 1, 1),
    "inf": (lambda p: h5(p, with_row(np.full((32, 3), np.inf, np.float32))), "NaN or Inf at point 0", 1, 1),
    "float64-overflow": (lambda p: h5(p, good_cloud(3).astype("f8") * 1e300), "NaN or Inf", 1, 0),
    "beyond-float32-norm": (
        lambda p: h5(p, with_row(good_cloud()[0] * np.float32(1e30))),
        r"coordinates reach [0-9.]+e\+30, beyond ±1e\+18",
        1,
        1,
    ),
    "zero-points": (lambda p: h5(p, np.zeros((3, 0, 3), np.float32)), r"'data' must be \[N, P, 3\]", 3, None),
    "one-point": (lambda p: h5(p, good_cloud(3, points=1)), "only 1 points", 1, 0),
    "two-columns": (lambda p: h5(p, good_cloud(3)[:, :, :2]), r"'data' must be \[N, P, 3\]", 3, None),
    "scalar-data": (lambda p: h5(p, np.float32(1.0)), r"'data' must be \[N, P, 3\]", 1, None),
    "no-data": (lambda p: h5py.File(p, "w").close(), "no 'data' dataset .*counts as 1 skipped row", 1, None),
    "data-group": (
        lambda p: h5py.File(p, "w").create_group("data").file.close(),
        "'data' is a group",
        1,
        None,
    ),
    "labels-two-columns": (
        lambda p: h5(p, good_cloud(3), np.zeros((3, 2), np.int64)),
        r"'label' must be \[N\] or \[N, 1\]",
        3,
        None,
    ),
    "labels-strings": (
        lambda p: h5(p, good_cloud(3), np.array([b"a", b"b", b"c"])),
        "must hold numbers",
        3,
        None,
    ),
    "label-nan": (
        lambda p: h5(p, good_cloud(3), np.array([0.0, np.nan, 1.0])),
        "label nan is not an integer",
        1,
        1,
    ),
    "label-huge": (
        lambda p: h5(p, good_cloud(3), np.array([0, 2**62, 0])),
        "label 4611686018427387904 outside",
        1,
        1,
    ),
    "names-short": (
        lambda p: h5(p, good_cloud(3), name=np.array([b"a", b"b"])),
        "'name' must hold 3 strings",
        3,
        None,
    ),
    "name-not-utf8": (
        lambda p: h5(p, good_cloud(3), name=np.array([b"a", b"\xff", b"c"])),
        "not UTF-8",
        1,
        1,
    ),
    "name-newline": (
        lambda p: h5(p, good_cloud(3), name=np.array([b"a", b"x\ny", b"c"])),
        "not a usable id",
        1,
        1,
    ),
}


@pytest.mark.parametrize("case", list(H5_CASES))
def test_hostile_h5(tmp_path: Path, case: str) -> None:
    write, problem, rows, index = H5_CASES[case]
    root = tmp_path / "h5"
    root.mkdir()
    write(root / "train.h5")
    fixtures.modelnet_h5(tmp_path / "good", n_train=2, n_test=1)
    (tmp_path / "good" / "train.h5").rename(root / "good_train.h5")  # one sound file beside the bad one
    with peak_memory(48 * MB):
        good, errors = drain(str(root), format="modelnet40")
    assert str(root / "good_train.h5") in {s.source for s in good}
    assert errors, f"{case}: no error"
    for err in errors:
        assert err.source == str(root / "train.h5")
        assert re.search(problem, err.problem), f"{case}: {err.problem}"
    assert (errors[0].index, errors[0].rows) == (index, rows)
    if index is None:  # a problem of the whole file: named once
        assert len(errors) == 1


def test_hostile_h5_zip_bomb_is_read_a_block_at_a_time(tmp_path: Path) -> None:
    h5_zip_bomb(tmp_path / "train.h5")
    assert (tmp_path / "train.h5").stat().st_size < 1_000_000
    with peak_memory(32 * MB):  # blocks of 512 rows of 4096 points (24 MiB) of the 75 MiB it holds
        good, errors = drain(str(tmp_path), format="modelnet40")
    assert not good
    assert len(errors) == 1600
    assert all("degenerate cloud" in e.problem for e in errors)


def test_hostile_h5_where_a_directory_or_a_link_loop_is_named_like_the_file(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "dir_train.h5").mkdir()
    os.symlink("loop_train.h5", tmp_path / "a" / "loop_train.h5")
    with pytest.raises(DataError, match=r"no \.h5 files found"):
        open_source(str(tmp_path / "a"), "modelnet40")
    fixtures.modelnet_h5(tmp_path / "a", n_train=2, n_test=1)  # now a real one too: the others are ignored
    good, errors = drain(str(tmp_path / "a"))
    assert len(good) == 3
    assert not errors


def test_the_coordinate_limit_is_where_float32_normalisation_still_works() -> None:
    """Training normalises float32 clouds (centre, divide by the largest norm); beyond the limit the squared
    norms overflow and the cloud becomes zeros in training while evaluation (float64) sees the object."""
    cloud = good_cloud()[0]
    at_limit = normalize_unit_sphere((cloud / np.abs(cloud).max() * np.float32(MAX_COORDINATE))[None])
    assert np.isfinite(at_limit).all()
    assert np.linalg.norm(at_limit[0], axis=1).max() == pytest.approx(1.0, rel=1e-5)
    with np.errstate(over="ignore", invalid="ignore"):
        far = normalize_unit_sphere((cloud * np.float32(1e30))[None])
    assert not np.abs(far).max() > 0  # all zeros (or NaN): what check_points keeps out of the shards


def test_clouds_too_small_to_normalise_are_named() -> None:
    sample = Sample("tiny", good_cloud()[0] * np.float32(1e-14), source="tiny.npy")
    with pytest.raises(DataError, match=r"tiny\.npy \[index 0\]: cloud radius .* is below 1e-10"):
        check_points(sample, MIN_POINTS)


def test_rendered_views_need_two_like_source_views() -> None:
    sample = Sample("one", good_cloud()[0], source="one.npy")
    pts = check_points(sample, MIN_POINTS)
    with pytest.raises(
        DataError, match=r"one\.npy \[index 0\]: 1 rendered view\(s\); CrossMoCo needs at least 2"
    ):
        check_views(sample, pts, RenderSpec(azimuths=(0.0,), size=16))
    assert len(check_views(sample, pts, SPEC)[0]) == 2


# ---- file-per-object folders: npy, ply (ascii and binary), off, obj, xyz/txt ------------------------------


def npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False, "shape": shape})
    return header.getvalue()


def npy_text_header(text: str) -> bytes:
    """A .npy file whose header is ``text`` as is (numpy parses it as Python literals)."""
    return b"\x93NUMPY\x01\x00" + (len(text) + 1).to_bytes(2, "little") + text.encode() + b"\n" + bytes(384)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=allow_pickle)
    return out.getvalue()


def ply_bytes(points: np.ndarray, binary: bool, tmp: Path) -> bytes:
    write_ply(tmp, points, binary=binary)
    return tmp.read_bytes()


def ply_nan_row(points: np.ndarray, tmp: Path) -> bytes:
    """An ascii PLY whose first vertex row is ``nan nan nan``."""
    data = ply_bytes(points[:-1], False, tmp).replace(b"vertex 31", b"vertex 32")
    return data.replace(b"end_header\n", b"end_header\nnan nan nan\n")


def off_text(vertices: np.ndarray, faces: list[list[int]], counts: str | None = None) -> bytes:
    head = counts or f"{len(vertices)} {len(faces)} 0"
    body = "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in vertices.tolist())
    body += "".join(f"{len(f)} {' '.join(map(str, f))}\n" for f in faces)
    return f"OFF\n{head}\n{body}".encode()


TRI = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
TRI_FACES = [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]
RANDOM = np.random.default_rng(1).bytes(3000)


def folder_corpus(root: Path) -> dict[str, str]:
    """Write the hostile files under ``root/thing/`` (beside one good file per format); return each file's
    expected problem (a regex)."""
    d = root / "thing"
    d.mkdir(parents=True)
    cloud = good_cloud()[0]
    scratch = root.parent / "scratch.ply"
    files: dict[str, tuple[bytes, str]] = {
        # npy
        "random.npy": (RANDOM, "unreadable .npy header"),
        "empty.npy": (b"", "unreadable .npy header"),
        "claim.npy": (npy_header((10**12, 3)) + bytes(48), r"header declares shape \(1000000000000, 3\)"),
        "truncated.npy": (npy_bytes(cloud)[:200], "header declares shape"),
        "pickled.npy": (npy_bytes(np.array([{"x": 1}] * 3), allow_pickle=True), "not numbers"),
        "complex.npy": (npy_bytes(cloud.astype(np.complex64)), "not numbers"),
        "nan.npy": (npy_bytes(np.where(np.arange(32)[:, None] == 5, np.nan, cloud)), "NaN or Inf at point 5"),
        "zero.npy": (npy_bytes(np.zeros((0, 3), np.float32)), "empty point cloud"),
        "one.npy": (npy_bytes(cloud[:1]), "only 1 points"),
        "far.npy": (npy_bytes(cloud * 1e30), r"coordinates reach .*e\+30"),
        "flat.npy": (npy_bytes(cloud[:, :2]), r"points must be \[N, 3\]"),
        "unbalanced.npy": (
            npy_text_header("{'descr': '<f4', 'fortran_order': False, 'shape': (32, 3, }"),
            "header",
        ),
        "negative.npy": (npy_header((-5, 3)) + bytes(60), r"points must be \[N, 3\]"),
        # ply, binary and ascii
        "random.ply": (RANDOM, "not a PLY file"),
        "empty.ply": (b"", "not a PLY file"),
        "truncated.ply": (ply_bytes(cloud, True, scratch)[:-50], "truncated PLY"),
        "truncated_ascii.ply": (ply_bytes(cloud, False, scratch)[:-300], "truncated PLY"),
        "claim.ply": (
            ply_bytes(cloud, True, scratch).replace(b"vertex 32", b"vertex 1000000000"),
            "expected 1000000000 vertices",
        ),
        "claim_ascii.ply": (
            ply_bytes(cloud, False, scratch).replace(b"vertex 32", b"vertex 1000000000"),
            "expected 1000000000 vertices",
        ),
        "face_claim.ply": (
            b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
            b"element face 1000000000\nproperty list uchar int vertex_indices\nend_header\n"
            b"0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n",
            "PLY header declares 3 'vertex', 1000000000 'face' rows",
        ),
        "nan_ascii.ply": (ply_nan_row(cloud, scratch), "NaN or Inf at point 0"),
        "inf.ply": (ply_bytes(np.full((32, 3), np.inf, np.float32), True, scratch), "NaN or Inf"),
        "zero.ply": (ply_bytes(np.zeros((0, 3)), True, scratch), "empty point cloud"),
        "one_ascii.ply": (ply_bytes(cloud[:1], False, scratch), "only 1 points"),
        "far.ply": (ply_bytes(cloud * np.float32(1e30), True, scratch), r"coordinates reach .*e\+30"),
        "text_values.ply": (
            ply_bytes(cloud, False, scratch).replace(b"end_header\n", b"end_header\nx y z\n"),
            "unparseable ascii vertex value",
        ),
        "negative_list.ply": (
            b"ply\nformat binary_little_endian 1.0\nelement junk 100000000\nproperty list char int idx\n"
            b"element vertex 3\nproperty float x\nproperty float y\nproperty float z\nend_header\n\xff"
            + bytes(99),
            "a list property has the negative length -1",
        ),
        "big_header.ply": (b"ply\nformat ascii 1.0\n" + b"comment " + b"x" * 70000 + b"\n", "end_header"),
        # off
        "random.off": (RANDOM, "unreadable mesh"),
        "empty.off": (b"", "unreadable mesh"),
        "claim.off": (
            off_text(TRI, TRI_FACES, "4 1000000000 0"),
            "OFF header declares 4 vertices and 1000000000",
        ),
        "nan.off": (off_text(np.where(TRI == 1.0, np.nan, TRI), TRI_FACES), "NaN or infinite"),
        "no_faces.off": (off_text(TRI, []), "empty mesh: no faces"),
        "bad_index.off": (off_text(TRI, [[0, 1, 7]]), "face index outside|face indices outside"),
        "flat.off": (off_text(TRI * [1, 0, 0], [[0, 1, 2]]), "zero surface area"),
        "far.off": (off_text(TRI * 1e30, TRI_FACES), r"vertex coordinates reach 1e\+30"),
        "overflow.off": (off_text(TRI * 1e200, TRI_FACES), r"vertex coordinates reach 1e\+200"),
        # obj
        "random.obj": (RANDOM, "unreadable mesh|empty mesh"),
        "empty.obj": (b"", "unreadable mesh|empty mesh"),
        "zero.obj": (
            b"mtllib zero.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv nan 0 1\nf 1 2 3\nf 1 2 4\n",
            "NaN or inf",
        ),
        "bad_index.obj": (b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n", "unreadable mesh|face indices outside"),
        "short_vertex.obj": (
            b"v 1.000000 -1.000000 -1.000000\nv 1.000000 -1.000000 1.000000\nv 1.000000 1.000000 \n"
            b"v 1.000000 1.000000 1.000000\nf 1 2 4 3",
            "unreadable mesh",
        ),
        "gzipped.obj": (gzip.compress(b"v 0 0 0\n" * 1000), "unreadable mesh|empty mesh"),
        # text points
        "random.xyz": (RANDOM, "unreadable point file"),
        "nan.xyz": (b"nan nan nan\n" * 20, "NaN or Inf"),
        "columns.txt": (b"1,2\n3,4\n", r"points must be \[N, 3\]"),
        "ragged.xyz": (b"1 2 3\n4 5\n", "unreadable point file"),
        "empty.txt": (b"", "empty point file"),
    }
    for name, (data, _) in files.items():
        (d / name).write_bytes(data)
    os.symlink("/dev/zero", d / "zero.mtl")  # the OBJ's material: never opened
    # Good files, one per format, so the folder is a source and each reader is shown to work.
    np.save(d / "good.npy", cloud)
    write_ply(d / "good.ply", cloud, binary=True)
    write_ply(d / "good_ascii.ply", cloud, binary=False)
    (d / "good.off").write_bytes(off_text(TRI, TRI_FACES))
    # A vertex no face uses, NaN: dropped (the renderer frames every vertex and refused NaN).
    (d / "stray_vertex.off").write_bytes(off_text(np.vstack([TRI, [np.nan] * 3]), TRI_FACES))
    np.savetxt(d / "good.xyz", cloud)
    # Not files: skipped without a word (nothing in them to count).
    (d / "dir.npy").mkdir()
    os.mkfifo(d / "fifo.ply")
    os.symlink("loop.off", d / "loop.off")
    os.symlink("/dev/zero", d / "dev.npy")
    os.symlink(d / "missing.npy", d / "dangling.npy")
    os.symlink("..", d / "up")  # a cycle of folders
    return {name: problem for name, (_, problem) in files.items()}


def test_hostile_folder_of_point_and_mesh_files(tmp_path: Path) -> None:
    expected = folder_corpus(tmp_path / "pf")
    with peak_memory(64 * MB):
        good, errors = drain(str(tmp_path / "pf"), num_points=64)
    assert sorted(Path(s.source).name for s in good) == [
        "good.npy",
        "good.off",
        "good.ply",
        "good.xyz",
        "good_ascii.ply",
        "stray_vertex.off",
    ]
    named = by_file(errors)
    assert sorted(named) == sorted(expected), set(named) ^ set(expected)
    for name, problem in expected.items():
        [err] = named[name]
        assert re.search(problem, err.problem), f"{name}: {err.problem}"
        assert err.index == 0 or err.index is None
        assert err.rows == 1


def test_hostile_folder_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = os.fsencode(tmp_path / "pf")
    cloud = good_cloud()[0]
    names = (
        (b"chair", b"good.npy"),
        (b"\xff\xfe", b"a.npy"),
        (b"chair", b"\xfe.ply"),
        (b"chair", b"b\xc3(.npy"),
    )
    for folder, name in names:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        data = npy_bytes(cloud) if name.endswith(b".npy") else ply_bytes(cloud, True, tmp_path / "s.ply")
        with open(os.path.join(root, folder, name), "wb") as f:
            f.write(data)
    good, errors = drain(os.fsdecode(root))
    assert [s.id for s in good] == ["chair/good"]
    assert len(errors) == 3
    assert all("not valid UTF-8" in e.problem for e in errors)
    print(*errors)  # prints on a strict UTF-8 stream


def test_hostile_shapenet_render_views(tmp_path: Path) -> None:
    root = fixtures.shapenet_render(tmp_path / "snr", objects=4, views=2)
    views = root / "ShapeNetRendering"
    (views / "02691156" / "model000" / "rendering" / "00.png").write_bytes(RANDOM)  # not an image
    (views / "03001627" / "model001" / "rendering" / "01.png").unlink()  # one view left
    for png in (views / "02691156" / "model002" / "rendering").glob("*.png"):
        png.unlink()
        png.mkdir()  # directories named like views
    cloud = root / "ShapeNet" / "03001627" / "model003.ply"
    cloud.write_bytes(cloud.read_bytes()[:-30])
    os.mkfifo(root / "ShapeNet" / "03001627" / "fifo.ply")
    good, errors = drain(str(root))
    assert not good
    named = {Path(e.source).name: e.problem for e in errors}
    assert re.search("view 0 is not a readable image", named["model000.ply"])
    assert re.search(r"1 view\(s\); CrossMoCo needs at least 2", named["model001.ply"])
    assert re.search("no rendered views", named["model002.ply"])
    assert re.search("truncated PLY|vertex row has", named["model003.ply"])
    assert len(errors) == 4


def test_hostile_shapenet_render_views_that_decode_to_too_many_pixels(tmp_path: Path) -> None:
    """A small PNG whose header claims 13000x13000 pixels is refused by its header, naming the file and the
    size, without being decoded (bounded memory) and without Pillow's warning."""
    from tests.data.test_render import bomb_png

    root = fixtures.shapenet_render(tmp_path / "snr", objects=2, views=3)
    bomb = bomb_png(13000)
    rendering = root / "ShapeNetRendering" / "02691156" / "model000" / "rendering"
    for png in rendering.glob("*.png"):
        png.write_bytes(bomb)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would be an error here
        with peak_memory(32 * MB):
            good, errors = drain(str(root))
    assert [s.id for s in good] == ["03001627/model001"]
    [err] = errors
    assert err.source == str(rendering / "00.png")
    assert re.search("13000x13000 pixels is over the limit", err.problem)
    # A shard view (bytes that prepare wrote, decoded by the pipeline) meets the same limit.
    item = Sample("x", fixtures.clouds(1, 64, 3)[0], [bomb, bomb], 0, "s.ply", 0, "train")
    with pytest.raises(DataError, match=r"view 0 is not a readable image: .*13000x13000 pixels"):
        check_views(item, item.points, SPEC)


def test_hostile_headers_with_non_ascii_digits(tmp_path: Path) -> None:
    """Latin-1 superscripts are digits to str.isdigit but not to int(): each file is a named DataError, and
    has_meshes (which reads PLY face counts) does not stop on them."""
    d = tmp_path / "pf" / "chair"
    d.mkdir(parents=True)
    cloud = fixtures.clouds(1, 64, 3)[0]
    write_ply(d / "good.ply", cloud, binary=False)
    text = (d / "good.ply").read_bytes()
    (d / "vertex.ply").write_bytes(text.replace(b"element vertex 64", b"element vertex \xb2"))
    face = b"element face \xb9\nproperty list uchar int vertex_indices\nend_header"
    (d / "face.ply").write_bytes(text.replace(b"end_header", face))
    (d / "counts.off").write_bytes(b"OFF\n\xb3 \xb9 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    src = open_source(str(tmp_path / "pf"))
    assert src.has_meshes() is True  # counts.off is a mesh file
    good, errors = drain(str(tmp_path / "pf"), num_points=64)
    assert [Path(s.source).name for s in good] == ["good.ply"]
    named = {Path(e.source).name: e.problem for e in errors}
    assert sorted(named) == ["counts.off", "face.ply", "vertex.ply"]
    assert re.search("malformed element line", named["vertex.ply"])
    assert re.search("malformed element line", named["face.ply"])
    assert re.search("unreadable mesh", named["counts.off"])


def test_hostile_h5_file_names_that_are_not_utf8(tmp_path: Path) -> None:
    """Ids come from the 'name' dataset when there is one, else from the file name: which must be text."""
    root = os.fsencode(tmp_path)
    h5(Path(os.fsdecode(os.path.join(root, b"train_\xff.h5"))), good_cloud(3))
    h5(Path(os.fsdecode(os.path.join(root, b"train_\xfe.h5"))), good_cloud(2), name=np.array([b"a", b"b"]))
    good, errors = drain(str(tmp_path), format="modelnet40")
    assert [s.id for s in good] == ["a", "b"]
    [err] = errors
    assert "train_\\udcff.h5" in err.source
    assert (err.rows, err.index) == (3, None)
    assert "not valid UTF-8" in err.problem
    print(err, *good)


def test_hostile_shapenet_render_names_that_are_not_utf8(tmp_path: Path) -> None:
    root = fixtures.shapenet_render(tmp_path / "snr", objects=2, views=2)
    clouds = os.fsencode(root / "ShapeNet")
    os.rename(os.path.join(clouds, b"03001627"), os.path.join(clouds, b"\xff3001627"))
    good, errors = drain(str(root))
    assert [s.id for s in good] == ["02691156/model000"]
    [err] = errors
    assert "not valid UTF-8" in err.problem
    print(err)


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A few random edits: flipped bytes, cuts, inserted random bytes or hostile tokens, a truncation."""
    out = bytearray(data)
    tokens = [b"1000000000", b"-1", b"nan", b"inf", b"1e300", b"4294967295", b"\xff", b"\n", b"(", b"0"]
    for _ in range(int(rng.integers(1, 6))):
        i = int(rng.integers(0, max(len(out), 1)))
        op = int(rng.integers(0, 5))
        if op == 0 and out:
            out[i] = int(rng.integers(0, 256))
        elif op == 1:
            del out[i : i + int(rng.integers(1, 50))]
        elif op == 2:
            out[i:i] = rng.bytes(int(rng.integers(1, 20)))
        elif op == 3:
            del out[i:]
        else:
            out[i:i] = tokens[int(rng.integers(0, len(tokens)))]
    return bytes(out)


def test_mutated_files_give_only_data_errors(tmp_path: Path) -> None:
    """Seeded random damage to a valid file of each format: a sample or a DataError, never another error
    (this found numpy's TokenError on a damaged .npy header and trimesh's odd arrays on a damaged OBJ)."""
    cloud = good_cloud()[0]
    v, q = fixtures.cube_mesh()
    seeds = {
        "b.ply": ply_bytes(cloud, True, tmp_path / "s.ply"),
        "a.ply": ply_bytes(cloud, False, tmp_path / "s.ply"),
        "m.ply": fixtures.write_ply_mesh(tmp_path / "m.ply", v, q).read_bytes(),
        "c.npy": npy_bytes(cloud),
        "t.off": off_text(TRI, TRI_FACES),
        "o.obj": fixtures.write_obj(tmp_path / "o.obj", v, q).read_bytes(),
        "p.xyz": b"".join(b"%g %g %g\n" % tuple(row) for row in cloud),
    }
    rng = np.random.default_rng(27)
    d = tmp_path / "pf" / "thing"
    d.mkdir(parents=True)
    for round_ in range(12):
        for name, data in seeds.items():
            (d / f"{round_}_{name}").write_bytes(mutate(data, rng))
    good, errors = drain(str(tmp_path / "pf"), num_points=64)
    assert len(good) + len(errors) == 12 * len(seeds)
    assert all(e.source.startswith(str(d)) for e in errors)
