"""The header of a PLY file: parsed into its format and elements, and what can be told from it alone.

- Formats: ``ascii 1.0``, ``binary_little_endian 1.0`` and ``binary_big_endian 1.0``.
- Any numeric property type, under its classic name (``uchar``, ``float``...) or its sized alias
  (``uint8``, ``float32``...); list properties with an integer length prefix.
- From the header alone: the faces a file declares (:func:`ply_face_count`), and whether the body can hold
  the rows the header declares (:func:`check_ply_claims`), before a reader that trusts it allocates them.
- Every problem raises :class:`DataError` naming the file.

The body (the vertices) is read by :mod:`.ply`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crossmoco_ray.bounded import printable
from crossmoco_ray.errors import DataError

# PLY type name -> numpy type code (without byte order); the sized aliases come from later PLY writers.
_TYPES: dict[str, str] = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_FORMATS: dict[str, str | None] = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}


@dataclass(frozen=True)
class Property:
    """One property of an element, as the header declares it."""

    name: str
    type: str  # numpy code of the value, or of the list items for a list property
    count_type: str | None = None  # numpy code of a list's length prefix; None for a scalar property


@dataclass(frozen=True)
class Element:
    """One element of the header (``vertex``, ``face``...): its row count and properties, in file order."""

    name: str
    count: int
    properties: tuple[Property, ...]

    @property
    def has_lists(self) -> bool:
        return any(p.count_type is not None for p in self.properties)


def parse_header(data: bytes, source: str) -> tuple[str | None, list[Element], int]:
    """The byte order (``None`` for ascii), the elements in file order and the offset of the body."""
    first = data[:4]
    if first != b"ply\n" and data[:5] != b"ply\r\n":
        raise DataError(source, "not a PLY file (it does not start with the 'ply' magic line)")
    end = data.find(b"end_header")
    if end < 0:
        raise DataError(source, "PLY header has no 'end_header' line")
    body = end + len(b"end_header")
    # The terminator of the last header line; checking the byte right after 'end_header' cannot
    # mistake the first binary byte for part of it.
    if data[body : body + 2] == b"\r\n":
        body += 2
    elif data[body : body + 1] == b"\n":
        body += 1
    else:
        raise DataError(source, "PLY header line 'end_header' is not followed by a newline")

    byte_order: str | None = None
    seen_format = False
    elements: list[tuple[str, int, list[Property]]] = []
    for number, raw in enumerate(data[:end].decode("latin-1").splitlines()[1:], start=2):
        words = raw.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        key = words[0]
        if key == "format":
            if len(words) != 3 or words[1] not in _FORMATS:
                raise DataError(
                    source, f"unsupported PLY format {printable(raw.strip(), 120)!r} (header line {number})"
                )
            if words[2] not in ("1.0", "1"):
                raise DataError(
                    source, f"unsupported PLY version {printable(words[2], 60)!r} (header line {number})"
                )
            byte_order, seen_format = _FORMATS[words[1]], True
        elif key == "element":
            # ASCII digits only: the header is read as latin-1, where '²' is a digit that int() refuses.
            if len(words) != 3 or not re.fullmatch(r"[0-9]+", words[2]):
                raise DataError(
                    source, f"malformed element line {printable(raw.strip(), 120)!r} (header line {number})"
                )
            elements.append((words[1], int(words[2]), []))
        elif key == "property":
            if not elements:
                raise DataError(source, f"property before any element (header line {number})")
            elements[-1][2].append(_parse_property(words, raw, number, source))
        else:
            raise DataError(
                source, f"unknown PLY header keyword {printable(key, 60)!r} (header line {number})"
            )
    if not seen_format:
        raise DataError(source, "PLY header has no 'format' line")
    return byte_order, [Element(n, c, tuple(p)) for n, c, p in elements], body


def _parse_property(words: list[str], raw: str, number: int, source: str) -> Property:
    if len(words) == 5 and words[1] == "list":
        count_type, item_type = _TYPES.get(words[2]), _TYPES.get(words[3])
        if count_type is None or item_type is None or count_type[0] == "f":
            raise DataError(
                source, f"unsupported list property {printable(raw.strip(), 120)!r} (header line {number})"
            )
        return Property(words[4], item_type, count_type)
    if len(words) == 3 and words[1] in _TYPES:
        return Property(words[2], _TYPES[words[1]])
    raise DataError(source, f"unsupported property {printable(raw.strip(), 120)!r} (header line {number})")


def check_ply_claims(data: bytes, source: str) -> None:
    """Raise a :class:`DataError` when the element counts of a PLY file's header need more bytes than the file
    holds: checked before a reader that trusts the header (a mesh library) allocates what it declares.

    Each row takes at least its fixed-size properties and list length prefixes (binary), or two characters
    per property (ascii: a digit and a separator).
    """
    order, elements, offset = parse_header(data, source)
    body = len(data) - offset
    need = 0
    for e in elements:
        if e.count and not e.properties:
            raise DataError(
                source, f"PLY element {printable(e.name, 60)!r} declares {e.count} rows but no properties"
            )
        if order is None:
            row = 2 * len(e.properties)
        else:
            row = sum(np.dtype(p.count_type or p.type).itemsize for p in e.properties)
        need += e.count * row
    if need > body + 1:  # + 1: the last ascii line may lack its newline
        declared = ", ".join(f"{e.count} {printable(e.name, 60)!r}" for e in elements[:4])
        raise DataError(
            source,
            f"PLY header declares {declared} rows, which need at least {need} bytes, but only {body} follow "
            "the header (truncated, or a header that lies)",
        )


def ply_face_count(path: str | Path, header_bytes: int = 1 << 16) -> int:
    """How many faces a PLY file's header declares (0 for point clouds), reading only the header."""
    source = printable(path)
    try:
        with open(path, "rb") as f:
            head = f.read(header_bytes)
    except OSError as e:
        raise DataError(source, f"cannot read file ({e.strerror or e})") from None
    _, elements, _ = parse_header(head, source)
    return sum(e.count for e in elements if e.name == "face")
