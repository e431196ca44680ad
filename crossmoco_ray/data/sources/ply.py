"""Read the vertex positions of a PLY file; write simple PLY point clouds (tests and fixtures).

- The header (formats ascii and binary of either byte order, numeric property types under their classic
  or sized names) is parsed by :mod:`.ply_header`. The vertex element may carry further properties
  (normals, colours) in any order; only ``x``, ``y`` and ``z`` are returned.
- Elements other than ``vertex`` (faces, edges...) may come before or after it. Those before it are
  skipped, list properties included: fixed-size rows in one jump, list rows with one vectorised check
  when every row has the same counts (triangle meshes) and a row-by-row walk only otherwise.
- Every problem raises :class:`DataError` naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.data.sources.ply_header import Element, parse_header
from crossmoco_ray.errors import DataError

_STRUCT_CODES: dict[str, str] = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I"}


def _xyz_indices(vertex: Element, source: str) -> list[int]:
    names = [p.name for p in vertex.properties]
    missing = [axis for axis in "xyz" if axis not in names]
    if missing:
        raise DataError(
            source, f"vertex element has no {'/'.join(missing)} property (has {printable(names, 200)})"
        )
    for axis in "xyz":
        if vertex.properties[names.index(axis)].count_type is not None:
            raise DataError(source, f"vertex property {axis!r} is a list, expected a number")
    return [names.index(axis) for axis in "xyz"]


# ----------------------------------------------------------------------------------------------- binary


class _NegativeLength(Exception):
    """A binary list whose signed length prefix is negative (named as a :class:`DataError` by read_ply)."""


def _list_length(data: bytes, pos: int, order: str, count_type: str) -> int:
    """The length prefix of the list at ``pos``; a negative one (signed prefixes) would walk backwards."""
    (n,) = struct.unpack_from(order + _STRUCT_CODES[count_type], data, pos)
    if n < 0:
        raise _NegativeLength(n)
    return int(n)


def _row_dtype(element: Element, order: str, counts: list[int] | None = None) -> np.dtype:
    """Structured dtype of one row; list properties take ``counts[i]`` items (the i-th list)."""
    fields: list[tuple[str, str] | tuple[str, str, tuple[int]]] = []
    lists = 0
    for i, p in enumerate(element.properties):
        if p.count_type is None:
            fields.append((f"p{i}", order + p.type))
        else:
            assert counts is not None
            fields.append((f"n{i}", order + p.count_type))
            fields.append((f"p{i}", order + p.type, (counts[lists],)))
            lists += 1
    return np.dtype(fields)


def _walk_rows(data: bytes, offset: int, element: Element, order: str) -> tuple[int, int]:
    """Walk the rows of an element whose list lengths vary, one row at a time.

    Returns the offset after the element and the number of complete rows (less than ``element.count``
    when the file is truncated).
    """
    size = len(data)
    for row in range(element.count):
        pos = offset
        for p in element.properties:
            item = np.dtype(p.type).itemsize
            if p.count_type is None:
                pos += item
                continue
            prefix = np.dtype(p.count_type).itemsize
            if pos + prefix > size:
                return offset, row
            n = _list_length(data, pos, order, p.count_type)
            pos += prefix + n * item
        if pos > size:
            return offset, row
        offset = pos
    return offset, element.count


def _first_row_counts(data: bytes, offset: int, element: Element, order: str) -> list[int] | None:
    """The list lengths of the row at ``offset``, or ``None`` when the file ends inside it."""
    counts: list[int] = []
    pos = offset
    for p in element.properties:
        if p.count_type is None:
            pos += np.dtype(p.type).itemsize
            continue
        prefix = np.dtype(p.count_type).itemsize
        if pos + prefix > len(data):
            return None
        n = _list_length(data, pos, order, p.count_type)
        counts.append(n)
        pos += prefix + n * np.dtype(p.type).itemsize
    return counts if pos <= len(data) else None


def _read_binary_element(
    data: bytes, offset: int, element: Element, order: str
) -> tuple[np.ndarray | None, int, int]:
    """One binary element: its rows (``None`` if list lengths vary), the end offset, the rows found."""
    available = len(data) - offset
    if not element.has_lists:
        dtype = _row_dtype(element, order)
        found = min(element.count, available // dtype.itemsize) if dtype.itemsize else element.count
        rows = np.frombuffer(data, dtype=dtype, count=found, offset=offset)
        return rows, offset + found * dtype.itemsize, found
    # Guess that every row has the first row's list lengths (true of triangle meshes) and check the
    # guess on all rows at once; a wrong guess falls back to walking the rows one by one.
    counts = _first_row_counts(data, offset, element, order) if element.count else None
    if counts is not None:
        dtype = _row_dtype(element, order, counts)
        if available >= dtype.itemsize * element.count:
            rows = np.frombuffer(data, dtype=dtype, count=element.count, offset=offset)
            lists = [i for i, p in enumerate(element.properties) if p.count_type is not None]
            if all(np.all(rows[f"n{i}"] == n) for i, n in zip(lists, counts, strict=True)):
                return rows, offset + dtype.itemsize * element.count, element.count
    end, found = _walk_rows(data, offset, element, order)
    return None, end, found


def _binary_vertices(data: bytes, offset: int, vertex: Element, order: str, source: str) -> np.ndarray:
    xyz = _xyz_indices(vertex, source)
    rows, _, found = _read_binary_element(data, offset, vertex, order)
    if found < vertex.count:
        raise DataError(source, f"truncated PLY: expected {vertex.count} vertices, found {found}")
    if rows is None:
        return _walk_vertices(data, offset, vertex, order, xyz)
    return np.stack([rows[f"p{i}"] for i in xyz], axis=-1).astype(np.float32)


def _walk_vertices(data: bytes, offset: int, vertex: Element, order: str, xyz: list[int]) -> np.ndarray:
    """x/y/z of vertex rows that hold lists of varying length (rare): one row at a time."""
    out = np.empty((vertex.count, 3), dtype=np.float32)
    column = {index: axis for axis, index in enumerate(xyz)}
    pos = offset
    for row in range(vertex.count):
        for i, p in enumerate(vertex.properties):
            if p.count_type is None:
                if i in column:
                    out[row, column[i]] = np.frombuffer(data, order + p.type, count=1, offset=pos)[0]
                pos += np.dtype(p.type).itemsize
            else:
                n = _list_length(data, pos, order, p.count_type)
                pos += np.dtype(p.count_type).itemsize + n * np.dtype(p.type).itemsize
    return out


# ------------------------------------------------------------------------------------------------ ascii


def _ascii_vertices(data: bytes, offset: int, elements: list[Element], source: str) -> np.ndarray:
    # One row per line (as every ascii PLY writer does); blank lines carry nothing and are dropped.
    lines = [line for line in data[offset:].decode("latin-1").splitlines() if line.strip()]
    start = 0
    for element in elements:
        if element.name == "vertex":
            break
        start += element.count
    vertex = next(e for e in elements if e.name == "vertex")
    xyz = _xyz_indices(vertex, source)
    rows = lines[start : start + vertex.count]
    if len(rows) < vertex.count:
        raise DataError(source, f"truncated PLY: expected {vertex.count} vertices, found {len(rows)}")
    if not vertex.has_lists:
        width = len(vertex.properties)
        try:
            values = np.array(" ".join(rows).split(), dtype=np.float64)
        except ValueError as e:
            raise DataError(source, f"unparseable ascii vertex value ({e})") from None
        if values.size == vertex.count * width:
            return values.reshape(vertex.count, width)[:, xyz].astype(np.float32)
        # Wrong token count somewhere: find the row to name it.
        for row, line in enumerate(rows):
            if len(line.split()) != width:
                raise DataError(
                    source, f"vertex row has {len(line.split())} values, expected {width}", index=row
                )
    out = np.empty((vertex.count, 3), dtype=np.float32)
    for row, line in enumerate(rows):
        out[row] = _ascii_row_xyz(line.split(), vertex, xyz, source, row)
    return out


def _ascii_row_xyz(tokens: list[str], vertex: Element, xyz: list[int], source: str, row: int) -> list[float]:
    """x/y/z of one ascii vertex row that holds list properties."""
    values: dict[int, float] = {}
    pos = 0
    try:
        for i, p in enumerate(vertex.properties):
            if p.count_type is None:
                values[i] = float(tokens[pos])
                pos += 1
            else:
                length = int(tokens[pos])
                if length < 0:
                    raise ValueError(length)
                pos += 1 + length
    except (ValueError, IndexError):
        raise DataError(
            source, f"unparseable ascii vertex row {printable(' '.join(tokens), 120)!r}", index=row
        ) from None
    if pos != len(tokens):
        raise DataError(source, f"vertex row has {len(tokens)} values, expected {pos}", index=row)
    return [values[i] for i in xyz]


# ----------------------------------------------------------------------------------------------- public


def read_ply(path: str | Path) -> np.ndarray:
    """The vertex positions of a PLY file.

    Args:
        path: a PLY file (ascii, binary little or big endian).

    Returns:
        ``[N, 3]`` float32: x, y, z of every vertex, in file order.

    Raises:
        DataError: the file is not a PLY file, uses an unsupported format or type, has no vertex element
            or no x/y/z, is truncated, or holds unparseable ascii values.
    """
    source = printable(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(source, f"cannot read file ({e.strerror or e})") from None
    return ply_points(data, source)


def ply_points(data: bytes, source: str) -> np.ndarray:
    """:func:`read_ply` of a file's bytes (``source`` names it in errors)."""
    order, elements, offset = parse_header(data, source)
    vertex_index = next((i for i, e in enumerate(elements) if e.name == "vertex"), None)
    if vertex_index is None:
        raise DataError(
            source, f"PLY file has no vertex element (elements: {printable([e.name for e in elements], 200)})"
        )
    if order is None:
        return _ascii_vertices(data, offset, elements, source)
    vertex = elements[vertex_index]
    _xyz_indices(vertex, source)  # header problems before data problems
    try:
        for element in elements[:vertex_index]:
            _, offset, found = _read_binary_element(data, offset, element, order)
            if found < element.count:
                raise DataError(
                    source,
                    f"truncated PLY: element {printable(element.name, 60)!r} before the vertices has {found} "
                    f"of {element.count} rows; expected {vertex.count} vertices, found 0",
                )
        return _binary_vertices(data, offset, vertex, order, source)
    except _NegativeLength as err:
        raise DataError(source, f"a list property has the negative length {err.args[0]}") from None


def write_ply(path: str | Path, points: np.ndarray, binary: bool = True) -> None:
    """Write a point cloud as a PLY file with one ``vertex`` element of float x, y, z.

    Args:
        path: the file to write (overwritten).
        points: ``[N, 3]``, any real dtype; stored as float32.
        binary: binary little endian when true, ascii otherwise (9 significant digits, so float32
            values read back exactly).
    """
    pts = np.asarray(points)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ValueError(f"write_ply needs points of shape [N, 3], got {pts.shape}")
    pts = pts.astype(np.float32)
    fmt = "binary_little_endian" if binary else "ascii"
    header = (
        f"ply\nformat {fmt} 1.0\ncomment written by crossmoco_ray\nelement vertex {len(pts)}\n"
        "property float x\nproperty float y\nproperty float z\nend_header\n"
    ).encode("ascii")
    if binary:
        body = pts.astype("<f4").tobytes()
    else:
        body = "".join(f"{x:.9g} {y:.9g} {z:.9g}\n" for x, y, z in pts.tolist()).encode("ascii")
    Path(path).write_bytes(header + body)
