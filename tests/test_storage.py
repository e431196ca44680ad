"""Records of a run read back bounded and named (storage.read_json)."""

from __future__ import annotations

from pathlib import Path

import pytest

from crossmoco_ray.storage import read_json


def test_records_are_read_bounded_and_named(tmp_path: Path) -> None:
    assert read_json(str(tmp_path / "missing.json")) is None
    ok = tmp_path / "history.json"
    ok.write_text('{"epoch": [1, 2]}')
    assert read_json(str(ok)) == {"epoch": [1, 2]}
    big = tmp_path / "big.json"
    big.write_bytes(b'{"a": "' + b"x" * 2048 + b'"}')
    with pytest.raises(ValueError, match=r"big\.json: \d+ bytes, more than"):
        read_json(str(big), limit=1024)
    for name, blob, problem in (
        ("garbage.json", b"\xff\xfe{", "not a JSON record"),
        ("deep.json", b"[" * 100_000 + b"]" * 100_000, "not a JSON record|holds a JSON list"),
        ("list.json", b"[1, 2]", "holds a JSON list, not an object"),
    ):
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError, match=problem) as err:
            read_json(str(tmp_path / name))
        assert name in str(err.value)
        assert len(str(err.value)) < 400
