"""Bounded views of values read from files and command lines, which may be damaged or hostile.

- :func:`short_repr`: a ``repr`` of at most about :data:`REPR_CHARS` characters, whatever the value: a list
  that holds itself, shared references that expand to 2**60 items, a gigabyte string, an int of a million
  digits, an object whose own ``repr`` never ends. Every error message that shows a value read from a
  user's input shows it through this.
- :func:`shape_problem`: walks a plain structure (mappings, sequences, scalars) as the tree it expands to,
  counting a shared reference (a YAML alias, a pickle memo reference) every time it is reached, and says
  why the structure is too large, too deep or holds too much text, or ``None``. Readers call it before
  anything walks the structure whole (validation, hashing, printing), so that a tiny "billion laughs" file
  fails at once instead of hanging.
- :func:`printable`: a text (a file name, above all) safe to print on any terminal, cut to a length around
  an ellipsis.
- :func:`clip`: a text cut to a length (an exception's message from a library, a key).

This module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

REPR_CHARS = 200  # the longest view of one value in an error message
MAX_REPR_DEPTH = 6  # containers nested deeper are shown as […]
INT_DIGITS = 60  # ints with more decimal digits are shown by size (their decimal string costs time)

_CONTAINERS = (Mapping, list, tuple, set, frozenset)


class _Writer:
    """Collects text until ``limit`` characters; everything after is dropped (and marked with …)."""

    def __init__(self, limit: int) -> None:
        self.parts: list[str] = []
        self.left = limit
        self.full = False

    def write(self, text: str) -> bool:
        """Append ``text`` (cut to what is left); False once the limit is reached."""
        if self.full:
            return False
        if len(text) > self.left:
            text, self.full = text[: self.left], True
        self.parts.append(text)
        self.left -= len(text)
        return not self.full

    def text(self) -> str:
        return "".join(self.parts) + ("…" if self.full else "")


def short_repr(value: Any, limit: int = REPR_CHARS) -> str:
    """``repr(value)`` when it is short; else its first ``limit`` characters and "…", computed without
    ever building the whole repr (so a self-referencing or exponentially shared structure costs
    O(limit)). Objects that are not plain data show as ``<TypeName>`` (their ``repr`` is not called)."""
    out = _Writer(limit)
    _render(value, out, 0)
    return out.text()


def _render(value: Any, out: _Writer, depth: int) -> None:
    if value is None or isinstance(value, (bool, float, complex)):
        out.write(repr(value))
    elif isinstance(value, int):
        if value.bit_length() > INT_DIGITS * 3.33:
            out.write(f"<int of {value.bit_length()} bits>")
        else:
            out.write(repr(value))
    elif isinstance(value, (str, bytes, bytearray)):
        # the repr of a slice: a 1 GB string costs no more than a short one
        out.write(repr(value[: out.left + 1]))
    elif isinstance(value, _CONTAINERS):
        _render_container(value, out, depth)
    else:
        out.write(f"<{type(value).__name__}>")


def _render_container(value: Any, out: _Writer, depth: int) -> None:
    if isinstance(value, Mapping):
        open_, close = "{", "}"
    elif isinstance(value, list):
        open_, close = "[", "]"
    elif isinstance(value, tuple):
        open_, close = "(", ")"
    else:
        open_, close = "{", "}"
    if depth >= MAX_REPR_DEPTH:
        out.write(f"{open_}…{close}")
        return
    if not out.write(open_):
        return
    try:
        items = iter(value.items()) if isinstance(value, Mapping) else iter(value)
        for i, item in enumerate(items):
            if i and not out.write(", "):
                return
            if isinstance(value, Mapping):
                _render(item[0], out, depth + 1)
                if not out.write(": "):
                    return
                _render(item[1], out, depth + 1)
            else:
                _render(item, out, depth + 1)
            if out.full:
                return
    except Exception:  # a mapping whose iteration fails: show what was shown
        out.write("…")
        return
    if isinstance(value, tuple) and len(value) == 1:
        out.write(",")
    out.write(close)


def clip(text: str, limit: int = REPR_CHARS) -> str:
    """``text`` cut to ``limit`` characters (and "…" when cut)."""
    return text if len(text) <= limit else text[:limit] + "…"


def printable(text: object, limit: int = REPR_CHARS) -> str:
    """``text`` as an error message may show it: safe to print on any terminal and at most ``limit`` long.

    File names are bytes on Linux, and those that are not UTF-8 reach Python as lone surrogates
    (``os.fsdecode``), which ``print`` cannot encode; they are shown as ``\\udcff``-style escapes, as are
    control characters (a newline in a name must not forge a log line). A long text keeps its start and its
    end (a path's file name) around an ellipsis.
    """
    s = str(text)
    if len(s) > limit:
        head = (limit - 1) // 3
        s = s[:head] + "\u2026" + s[len(s) - (limit - 1 - head) :]
    s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    if not s.isprintable():
        s = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in s)
    return s


def first_line(text: str, limit: int = REPR_CHARS) -> str:
    """The first non-empty line of ``text`` (a library's multi-line message), cut to ``limit``."""
    head = text[: limit * 4]
    lines = [line.strip() for line in head.splitlines() if line.strip()]
    return clip(lines[0] if lines else "", limit)


def shape_problem(
    value: Any, max_values: int = 10_000, max_depth: int = 20, max_text: int = 1 << 20
) -> str | None:
    """Why ``value`` is too big to walk, or ``None``: more than ``max_values`` values (every scalar,
    mapping, sequence and key, a shared one counted each time it is reached), containers nested deeper
    than ``max_depth`` (a structure that holds itself is infinitely deep), or more than ``max_text``
    characters of strings and bytes in all. Costs O(max_values) whatever ``value`` is."""
    count, text = 0, 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    too_many = (
        f"holds more than {max_values} values (shared references such as YAML aliases count each time "
        "they are used)"
    )
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > max_values:
            return too_many
        if isinstance(node, (str, bytes, bytearray)):
            text += len(node)
            if text > max_text:
                return f"holds more than {max_text} characters of text"
            continue
        if not isinstance(node, _CONTAINERS):
            continue
        if depth >= max_depth:
            return f"is nested deeper than {max_depth} levels (or holds itself)"
        size = 2 * len(node) if isinstance(node, Mapping) else len(node)
        if count + len(stack) + size > max_values:
            return too_many
        if isinstance(node, Mapping):
            for key, item in node.items():
                stack.append((key, depth + 1))
                stack.append((item, depth + 1))
        else:
            stack.extend((item, depth + 1) for item in node)
    return None
