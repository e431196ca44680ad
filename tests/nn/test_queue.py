"""MemoryQueue: persistent, one pointer for both queues, FIFO overwrite; any global batch (the ring wraps),
the same rows as a contiguous write where the batch divides the length."""

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


def _contiguous_reference(length: int, dim: int, batches: list[torch.Tensor]) -> torch.Tensor:
    """The queue before wrapping existed: a batch that divides the length, written as one slice."""
    torch.manual_seed(0)
    keys = MemoryQueue(length, dim).keys.clone()
    ptr = 0
    for b in batches:
        assert length % b.shape[0] == 0
        keys[0, ptr : ptr + b.shape[0]] = b
        ptr = (ptr + b.shape[0]) % length
    return keys


def _ring_reference(initial: torch.Tensor, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Keys written one at a time, in order, around the ring: what any batching must leave."""
    keys, ptr = initial.clone(), 0
    for b in batches:
        for row in b:
            keys[0, ptr] = row
            ptr = (ptr + 1) % keys.shape[1]
    return keys, ptr


def test_a_batch_that_divides_the_length_writes_exactly_the_contiguous_rows() -> None:
    batches = [torch.randn(20, 4) for _ in range(7)]
    torch.manual_seed(0)
    q = MemoryQueue(length=80, dim=4)
    for b in batches:
        q.enqueue(b)
    assert torch.equal(q.keys, _contiguous_reference(80, 4, batches))  # bitwise: today's maths
    assert int(q.ptr) == (7 * 20) % 80


@pytest.mark.parametrize("sizes", [[20, 20, 20], [3, 5, 7, 11, 13], [30, 20, 30, 50], [9, 40, 2], [100, 7]])
def test_any_sequence_of_global_batches_wraps_around_the_ring(sizes: list[int]) -> None:
    """An elastic run's global batch changes with its workers (20 × 2, then 20 × 1, ...) and need not
    divide the length: the queue holds the newest keys in ring order, as if written one by one."""
    q = MemoryQueue(length=40, dim=4)
    initial = q.keys.clone()
    batches = [torch.randn(n, 4) for n in sizes]
    for b in batches:
        q.enqueue(b)
    keys, ptr = _ring_reference(initial, batches)
    assert torch.equal(q.keys, keys)
    assert int(q.ptr) == ptr == sum(sizes) % 40


def test_a_batch_longer_than_the_queue_keeps_its_newest_keys() -> None:
    q = MemoryQueue(length=6, dim=2)
    q.enqueue(torch.randn(2, 2))  # ptr 2
    b = torch.arange(20.0).view(10, 2)
    q.enqueue(b)
    keys, ptr = _ring_reference(torch.zeros(1, 6, 2), [torch.zeros(2, 2), b])
    assert torch.equal(q.keys, keys)
    assert int(q.ptr) == ptr == 0


def test_wrong_number_of_key_tensors() -> None:
    with pytest.raises(ValueError, match="expects 2 key tensors"):
        MemoryQueue(4, 2, names=("point", "image")).enqueue(torch.randn(2, 2))
