"""MemoryQueue: persistent, one pointer for both queues, FIFO overwrite, clear error on a bad length."""

from __future__ import annotations

import pytest
import torch

from crossmoco_ray.nn import MemoryQueue


def test_enqueue_writes_rows_at_the_shared_pointer_and_wraps() -> None:
    q = MemoryQueue(length=6, dim=2, names=("point", "image"))
    assert torch.allclose(q["point"].norm(dim=1), torch.ones(6))  # starts as random unit vectors
    for step in range(4):
        p = torch.full((3, 2), float(step))
        q.enqueue(p, -p)
        assert int(q.ptr) == (3 * (step + 1)) % 6
    # step 2 wrote rows 0-2, step 3 rows 3-5
    assert torch.equal(q["point"][:3], torch.full((3, 2), 2.0))
    assert torch.equal(q["point"][3:], torch.full((3, 2), 3.0))
    assert torch.equal(q["image"], -q["point"])


def test_state_dict_round_trip() -> None:
    q = MemoryQueue(length=8, dim=3, names=("point", "image"))
    q.enqueue(torch.randn(4, 3), torch.randn(4, 3))
    state = q.state_dict()
    assert set(state) == {"keys", "ptr"}
    fresh = MemoryQueue(length=8, dim=3, names=("point", "image"))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.keys, q.keys)
    assert int(fresh.ptr) == 4
    assert fresh.checksum() == q.checksum()


def test_length_not_a_multiple_of_the_batch_says_the_fix() -> None:
    q = MemoryQueue(length=4096, dim=4)
    with pytest.raises(ValueError, match=r"not a multiple of the global batch 20.*4080 or 4100"):
        q.enqueue(torch.randn(20, 4))


def test_wrong_number_of_key_tensors() -> None:
    with pytest.raises(ValueError, match="expects 2 key tensors"):
        MemoryQueue(4, 2, names=("point", "image")).enqueue(torch.randn(2, 2))
