"""read_ply / write_ply: the three formats, extra properties, elements before the vertices, bad files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from crossmoco_ray.data.sources.ply import read_ply, write_ply
from crossmoco_ray.errors import DataError


def cloud(n: int = 50, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)).astype(np.float32)


@pytest.mark.parametrize("binary", [True, False])
def test_round_trip(tmp_path: Path, binary: bool) -> None:
    pts = cloud()
    path = tmp_path / "c.ply"
    write_ply(path, pts, binary=binary)
    out = read_ply(path)
    assert out.dtype == np.float32
    assert out.shape == (50, 3)
    np.testing.assert_array_equal(out, pts)  # 9 significant digits make ascii exact for float32


def test_round_trip_empty_cloud(tmp_path: Path) -> None:
    write_ply(tmp_path / "e.ply", np.zeros((0, 3), np.float32))
    assert read_ply(tmp_path / "e.ply").shape == (0, 3)


def test_write_rejects_bad_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        write_ply(tmp_path / "x.ply", np.zeros((4, 2)))


def test_big_endian_double_with_int_coordinate(tmp_path: Path) -> None:
    # Hand-written: x as double, y as int16, z as float, big endian; comments and obj_info allowed.
    header = (
        b"ply\nformat binary_big_endian 1.0\ncomment by hand\nobj_info made in a test\n"
        b"element vertex 2\nproperty double x\nproperty int16 y\nproperty float z\nend_header\n"
    )
    body = struct.pack(">dhf", 1.5, -3, 0.25) + struct.pack(">dhf", -2.0, 7, 4.0)
    path = tmp_path / "be.ply"
    path.write_bytes(header + body)
    np.testing.assert_array_equal(read_ply(path), [[1.5, -3, 0.25], [-2.0, 7, 4.0]])


def _face_rows(faces: list[list[int]]) -> bytes:
    return b"".join(struct.pack(f"<B{len(f)}i", len(f), *f) for f in faces)


@pytest.mark.parametrize(
    "faces",
    [
        pytest.param([[0, 1, 2], [1, 2, 3], [2, 3, 0]], id="triangles"),
        pytest.param([[0, 1, 2], [0, 1, 2, 3], [3, 2, 1]], id="mixed-lengths"),
    ],
)
def test_extra_properties_and_face_element_before_vertices(tmp_path: Path, faces: list[list[int]]) -> None:
    pts = cloud(4)
    header = (
        "ply\nformat binary_little_endian 1.0\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nproperty ushort flags\n"
        "element vertex 4\n"
        "property float nx\nproperty float ny\nproperty float nz\n"
        "property float x\nproperty uchar red\nproperty float z\nproperty uchar green\n"
        "property float y\nproperty uchar blue\n"
        "element edge 1\nproperty int vertex1\nproperty int vertex2\n"
        "end_header\n"
    ).encode()
    # The face rows carry a scalar after the list, so the list length must really be read per row.
    face_rows = b"".join(struct.pack(f"<B{len(f)}iH", len(f), *f, 9) for f in faces)  # count, indices, flags
    vertex_rows = b"".join(
        struct.pack("<3ffBfBfB", 0.0, 0.0, 1.0, x, 255, z, 128, y, 1) for x, y, z in pts.tolist()
    )
    path = tmp_path / "mesh.ply"
    path.write_bytes(header + face_rows + vertex_rows + struct.pack("<ii", 0, 1))
    np.testing.assert_array_equal(read_ply(path), pts)


def test_ascii_with_face_before_vertices_and_crlf(tmp_path: Path) -> None:
    text = (
        "ply\r\nformat ascii 1.0\r\nelement face 2\r\nproperty list uchar int vertex_indices\r\n"
        "element vertex 3\r\nproperty uchar red\r\nproperty float x\r\nproperty float y\r\n"
        "property float z\r\n"
        "end_header\r\n3 0 1 2\r\n4 0 1 2 0\r\n10 1 2 3\r\n20 4 5 6\r\n30 -7 8.5 9e-1\r\n"
    )
    path = tmp_path / "a.ply"
    path.write_bytes(text.encode())
    np.testing.assert_allclose(read_ply(path), np.array([[1, 2, 3], [4, 5, 6], [-7, 8.5, 0.9]]))


def test_truncated_binary_names_file_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "short.ply"
    write_ply(path, cloud(10))
    path.write_bytes(path.read_bytes()[:-20])  # 12 bytes per vertex: 8 whole vertices remain
    with pytest.raises(DataError, match=r"short\.ply.*expected 10 vertices, found 8"):
        read_ply(path)


def test_truncated_binary_inside_element_before_vertices(tmp_path: Path) -> None:
    header = (
        b"ply\nformat binary_little_endian 1.0\nelement face 3\nproperty list uchar int vertex_indices\n"
        b"element vertex 1\nproperty float x\nproperty float y\nproperty float z\nend_header\n"
    )
    path = tmp_path / "cut.ply"
    path.write_bytes(header + _face_rows([[0, 1, 2], [0, 1, 2]])[:-3])
    with pytest.raises(DataError, match=r"cut\.ply.*truncated.*'face'"):
        read_ply(path)


def test_truncated_ascii_names_file_and_counts(tmp_path: Path) -> None:
    path = tmp_path / "short_ascii.ply"
    write_ply(path, cloud(10), binary=False)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-3]))
    with pytest.raises(DataError, match=r"short_ascii\.ply.*expected 10 vertices, found 7"):
        read_ply(path)


def test_unparseable_ascii_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n1 2 3\n4 five 6\n"
    )
    with pytest.raises(DataError, match=r"bad\.ply.*unparseable"):
        read_ply(path)


def test_ascii_row_with_wrong_value_count(tmp_path: Path) -> None:
    path = tmp_path / "ragged.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\nproperty float z\n"
        "end_header\n1 2 3\n4 5\n"
    )
    with pytest.raises(DataError, match=r"ragged\.ply \[index 1\].*2 values, expected 3"):
        read_ply(path)


def test_not_a_ply_file(tmp_path: Path) -> None:
    path = tmp_path / "cloud.off"
    path.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    with pytest.raises(DataError, match=r"cloud\.off.*not a PLY file"):
        read_ply(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nothere\.ply.*cannot read"):
        read_ply(tmp_path / "nothere.ply")


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("format binary_middle_endian 1.0\nelement vertex 0\nproperty float x\n", "unsupported PLY format"),
        ("format ascii 1.0\nelement face 0\nproperty list uchar int vertex_indices\n", "no vertex element"),
        ("format ascii 1.0\nelement vertex 0\nproperty float x\nproperty float z\n", "no y property"),
        ("format ascii 1.0\nelement vertex 0\nproperty float128 x\n", "unsupported property"),
        ("element vertex 0\nproperty float x\n", "no 'format' line"),
    ],
)
def test_header_problems(tmp_path: Path, header: str, problem: str) -> None:
    path = tmp_path / "h.ply"
    path.write_text(f"ply\n{header}end_header\n")
    with pytest.raises(DataError, match=rf"h\.ply.*{problem}"):
        read_ply(path)


def test_no_end_header(tmp_path: Path) -> None:
    path = tmp_path / "open.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 1\n")
    with pytest.raises(DataError, match="end_header"):
        read_ply(path)


@pytest.mark.parametrize("lengths", [[2, 2, 2], [0, 3, 1]], ids=["same-lengths", "varying-lengths"])
def test_list_property_inside_vertex_element(tmp_path: Path, lengths: list[int]) -> None:
    pts = cloud(3)
    header = (
        b"ply\nformat binary_big_endian 1.0\nelement vertex 3\nproperty float x\n"
        b"property list ushort short tags\nproperty float y\nproperty float z\nend_header\n"
    )
    body = b"".join(
        struct.pack(f">fH{n}hff", x, n, *range(n), y, z)
        for n, (x, y, z) in zip(lengths, pts.tolist(), strict=True)
    )
    path = tmp_path / "tags.ply"
    path.write_bytes(header + body)
    np.testing.assert_array_equal(read_ply(path), pts)


HUGE = 10**9


@pytest.mark.parametrize(
    ("fmt", "before"),
    [
        ("binary_little_endian", ""),
        ("ascii", ""),
        ("binary_little_endian", f"element junk {HUGE}\nproperty list uchar int idx\n"),
        ("ascii", f"element junk {HUGE}\nproperty list uchar int idx\n"),
    ],
    ids=["binary", "ascii", "binary-list-element-before", "ascii-list-element-before"],
)
def test_counts_claiming_more_than_the_file_holds(tmp_path: Path, fmt: str, before: str) -> None:
    """A 1 KB file whose header declares 10^9 rows: named at once, nothing of that size allocated."""
    import time
    import tracemalloc

    from crossmoco_ray.data.sources.ply_header import check_ply_claims

    header = f"ply\nformat {fmt} 1.0\n{before}element vertex {HUGE}\n"
    header += "property float x\nproperty float y\nproperty float z\nend_header\n"
    body = cloud(60).astype("<f4").tobytes() if fmt != "ascii" else b"0 0 0\n" * 100
    path = tmp_path / "lie.ply"
    path.write_bytes(header.encode() + body)
    tracemalloc.start()
    start = time.monotonic()
    try:
        with pytest.raises(DataError, match=r"lie\.ply: .*(truncated|expected)"):
            read_ply(path)
        with pytest.raises(DataError, match=rf"lie\.ply: PLY header declares .*{HUGE} 'vertex' rows"):
            check_ply_claims(path.read_bytes(), str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024**2
    assert time.monotonic() - start < 1


def test_element_with_rows_but_no_properties_is_named(tmp_path: Path) -> None:
    from crossmoco_ray.data.sources.ply_header import check_ply_claims

    data = b"ply\nformat binary_little_endian 1.0\nelement ghost 1000000000\nend_header\n"
    with pytest.raises(DataError, match="element 'ghost' declares 1000000000 rows but no properties"):
        check_ply_claims(data, "ghost.ply")


@pytest.mark.parametrize("count", ["\xb2", "\xb9", "\xb3"])
@pytest.mark.parametrize("element", ["vertex", "face"])
def test_non_ascii_digit_counts_are_named(tmp_path: Path, count: str, element: str) -> None:
    """Latin-1 '²' is a digit to str.isdigit but not to int(): a header count of ASCII digits only."""
    from crossmoco_ray.data.sources.ply_header import ply_face_count

    face = f"element face {count if element == 'face' else '1'}\nproperty list uchar int vertex_indices\n"
    header = (
        f"ply\nformat ascii 1.0\nelement vertex {count if element == 'vertex' else '3'}\n"
        f"property float x\nproperty float y\nproperty float z\n{face}end_header\n"
    )
    path = tmp_path / "c.ply"
    path.write_bytes(header.encode("latin-1") + b"0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n")
    for read in (read_ply, ply_face_count):
        with pytest.raises(DataError, match="malformed element line") as info:
            read(path)
        assert info.value.source == str(path)
