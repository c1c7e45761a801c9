"""Batch-size choice and the priority queue, without an event loop running the batcher."""

from __future__ import annotations

import asyncio

import pytest

from taskserve.server.scheduling.base import InferRequest
from taskserve.server.scheduling.policy import BatchPolicy
from taskserve.server.scheduling.request_queue import PendingRequest, RequestQueue

from .harness import token_config


@pytest.mark.parametrize(
    ("rows", "preferred", "taken"),
    [
        ([1, 1, 1, 1, 1], (), 5),
        ([1, 1, 1, 1, 1], (2, 4), 4),
        ([1, 2, 1], (3, 4), 3),
        ([2, 2], (3,), 2),  # no prefix sums to 3: take everything
        ([3, 1], (1, 4), 2),
    ],
)
def test_cut_takes_the_longest_prefix_at_a_preferred_size(
    rows: list[int], preferred: tuple[int, ...], taken: int
) -> None:
    assert BatchPolicy(max_rows=8, preferred_rows=preferred).cut(rows) == taken


def test_complete_when_full_blocked_or_at_the_largest_preferred_size() -> None:
    policy = BatchPolicy(max_rows=8, preferred_rows=(2, 4))
    assert not policy.is_complete(3, blocked=False)
    assert policy.is_complete(4, blocked=False)
    assert policy.is_complete(1, blocked=True)
    assert BatchPolicy(max_rows=8).is_complete(8, blocked=False)
    assert not BatchPolicy(max_rows=8).is_complete(7, blocked=False)


def test_policy_from_config() -> None:
    config = token_config(
        max_batch_size=0,
        dynamic_batching={
            "max_queue_delay_us": 1500,
            "default_timeout_us": 2_000_000,
            "preferred_batch_sizes": [4, 2],
        },
    )
    policy = BatchPolicy.from_config(config)
    assert policy.max_rows == 1  # no batch dimension: requests run alone
    assert policy.max_queue_delay_s == pytest.approx(0.0015)
    assert policy.default_timeout_s == pytest.approx(2.0)
    assert policy.preferred_rows == (2, 4)


def entry(loop: asyncio.AbstractEventLoop, seq: int, priority: int = 1, rows: int = 1, key: str = "k",
          deadline: float | None = None) -> PendingRequest:  # fmt: skip
    return PendingRequest(
        request=InferRequest(inputs={}), future=loop.create_future(), key=key, rows=rows, priority=priority,
        deadline=deadline, seq=seq, enqueued_at=0.0, enqueued_ns=0,
    )  # fmt: skip


def test_queue_serves_priority_then_arrival_order() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(priority_levels=3)
        entries = [entry(loop, 0, 3), entry(loop, 1, 2, key="other"), entry(loop, 2, 1), entry(loop, 3, 2)]
        for e in entries:
            queue.push(e)
        assert queue.head() is entries[2]
        candidate = queue.peek("k", max_rows=8, now=0.0)
        assert candidate.entries == [entries[2], entries[3], entries[0]]
        queue.take(candidate.entries)
        assert len(queue) == 1 and queue.head() is entries[1]
    finally:
        loop.close()


def test_peek_stops_at_the_first_request_that_does_not_fit_and_reaps_expired() -> None:
    loop = asyncio.new_event_loop()
    try:
        queue = RequestQueue(priority_levels=1)
        fits, expired, too_big, small = (
            entry(loop, 0, rows=2),
            entry(loop, 1, deadline=5.0),
            entry(loop, 2, rows=3),
            entry(loop, 3),
        )
        for e in (fits, expired, too_big, small):
            queue.push(e)
        candidate = queue.peek("k", max_rows=4, now=10.0)
        assert candidate.entries == [fits]
        assert candidate.blocked
        assert candidate.expired == [expired]
        assert len(queue) == 3  # the expired one left; nothing else was taken yet
        assert queue.remove(small) and not queue.remove(small)
    finally:
        loop.close()
