"""The dynamic batcher's behaviour, driven through a fake runtime.

Ordering is controlled with gates (threading.Event) that hold the runtime in
``infer``; nothing here asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from taskserve.server.errors import DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded, RuntimeFailure
from taskserve.server.metrics import ServerMetrics

from .fakes import FakeRuntime, ManualClock, masked_outputs
from .harness import batcher, dispatched, running, started, token_config, tokens, until


def first_ids(batch: dict[str, np.ndarray]) -> list[int]:
    """The first token id of every row: identifies which requests a batch held."""
    return [int(v) for v in batch["ids"][:, 0]]


async def test_lone_request_runs_at_once_even_with_a_long_delay() -> None:
    # The clock never moves: had the batcher decided to wait for the delay, it would wait forever.
    runtime = FakeRuntime()
    config = token_config(dynamic_batching={"max_queue_delay_us": 10_000_000})
    async with running(batcher(config, [runtime], clock=ManualClock())) as s:
        result = await asyncio.wait_for(s.submit(tokens(3)), 30)
    assert result.batch_size == 1
    np.testing.assert_array_equal(result.outputs["length"], [3])


async def test_partial_batch_waits_for_more_while_another_batch_runs() -> None:
    gate = threading.Event()
    busy, other = FakeRuntime(gate=gate), FakeRuntime()
    config = token_config(
        max_batch_size=3, instance_count=2, dynamic_batching={"max_queue_delay_us": 10_000_000}
    )
    async with running(batcher(config, [busy, other], clock=ManualClock()), gate) as s:
        first = asyncio.create_task(s.submit(tokens(2, first=1)))
        await started(busy)
        # One instance is free, but a batch is executing: b and c wait for a fuller batch...
        waiting = [asyncio.create_task(s.submit(tokens(2, first=f))) for f in (10, 20)]
        await until(lambda: s.inflight_count() == 3, "b and c queued")
        await dispatched(s)  # it has seen b and c with `other` free (a batch handed off now shows below)
        assert other.batches == []
        # ...and go as soon as the batch is full.
        waiting.append(asyncio.create_task(s.submit(tokens(2, first=30))))
        await started(other)
        results = await asyncio.gather(*waiting)
        gate.set()
        await first
    assert [first_ids(b) for b in other.batches] == [[10, 20, 30]]
    assert {r.batch_size for r in results} == {3}


async def test_partial_batch_goes_once_the_delay_has_passed() -> None:
    gate = threading.Event()
    busy, other = FakeRuntime(gate=gate), FakeRuntime()
    config = token_config(max_batch_size=4, instance_count=2, dynamic_batching={"max_queue_delay_us": 20_000})
    async with running(batcher(config, [busy, other]), gate) as s:
        first = asyncio.create_task(s.submit(tokens(2, first=1)))
        await started(busy)
        result = await asyncio.wait_for(s.submit(tokens(2, first=10)), 30)
        assert not first.done()  # computed on the other instance while the first is still held
        gate.set()
        await first
    assert result.batch_size == 1
    assert [first_ids(b) for b in other.batches] == [[10]]


async def test_batches_never_exceed_max_batch_size() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(max_batch_size=4)
    async with running(batcher(config, [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        sizes = [1, 3, 2, 1, 1, 4, 2, 1]  # rows per request
        tasks = [
            asyncio.create_task(s.submit(tokens(2, first=10 * (i + 1), rows=r))) for i, r in enumerate(sizes)
        ]
        await until(lambda: s.inflight_count() == len(sizes) + 1, "all queued")
        gate.set()
        results = await asyncio.gather(head, *tasks)
    rows_per_batch = [len(b["ids"]) for b in runtime.batches]
    assert max(rows_per_batch) <= 4
    assert sum(rows_per_batch) == 1 + sum(sizes)
    assert len(rows_per_batch) < 1 + len(sizes)  # some requests did share batches
    for result, r in zip(results[1:], sizes, strict=False):
        assert result.outputs["pooled"].shape == (r,)


async def test_request_with_more_rows_than_max_batch_size_is_refused() -> None:
    runtime = FakeRuntime()
    async with running(batcher(token_config(max_batch_size=2), [runtime])) as s:
        with pytest.raises(InvalidInput, match="max_batch_size is 2"):
            await s.submit(tokens(2, rows=3))
    assert runtime.batches == []


async def test_preferred_batch_size_is_taken_when_it_can_be_formed() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(max_batch_size=8, dynamic_batching={"preferred_batch_sizes": [2, 4]})
    async with running(batcher(config, [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        # Three single-row requests: 3 rows is no preferred size, so the batch is cut to 2.
        tasks = [
            asyncio.create_task(s.submit(tokens(1, first=f, rows=r))) for f, r in ((10, 1), (20, 1), (30, 1))
        ]
        await until(lambda: s.inflight_count() == 4, "queued")
        gate.set()
        await asyncio.gather(head, *tasks)
    assert [len(b["ids"]) for b in runtime.batches] == [1, 2, 1]


async def test_complete_preferred_batch_is_handed_ahead_while_the_instance_is_busy() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(max_batch_size=8, dynamic_batching={"preferred_batch_sizes": [3]})
    async with running(batcher(config, [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        tasks = [asyncio.create_task(s.submit(tokens(1, first=10 * i))) for i in range(1, 6)]
        await until(lambda: s.inflight_count() == 6, "queued")
        gate.set()
        await asyncio.gather(head, *tasks)
    # The first three reached the preferred size and were prefetched; the last two followed.
    assert [first_ids(b) for b in runtime.batches] == [[1], [10, 20, 30], [40, 50]]


async def test_variable_lengths_are_padded_with_pad_value_and_outputs_unpadded() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    async with running(batcher(token_config(), [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        requests = [tokens(3, first=10), tokens(5, first=20), tokens(2, first=30)]
        tasks = [asyncio.create_task(s.submit(r)) for r in requests]
        await until(lambda: s.inflight_count() == 4, "queued")
        gate.set()
        results = await asyncio.gather(*tasks)
        await head
    batch = runtime.batches[1]
    assert batch["ids"].shape == (3, 5)
    np.testing.assert_array_equal(batch["ids"][0], [10, 11, 12, 7, 7])  # ids pad_value 7
    np.testing.assert_array_equal(batch["mask"][2], [1, 1, 0, 0, 0])  # mask pad_value 0
    for request, result in zip(requests, results, strict=False):
        alone = masked_outputs(dict(request.inputs))
        assert result.outputs["hidden"].shape == alone["hidden"].shape  # sliced back to its own length
        for name in ("hidden", "pooled", "length"):
            np.testing.assert_allclose(result.outputs[name], alone[name], rtol=1e-6)
        assert result.batch_size == 3


async def test_only_requested_outputs_are_returned() -> None:
    runtime = FakeRuntime()
    async with running(batcher(token_config(), [runtime])) as s:
        result = await s.submit(tokens(2, output_names=("pooled",)))
        with pytest.raises(InvalidInput, match="no output"):
            await s.submit(tokens(2, output_names=("nope",)))
    assert set(result.outputs) == {"pooled"}
    assert runtime.output_requests == [["pooled"]]


async def test_length_buckets_keep_short_requests_apart_from_long_ones() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(dynamic_batching={"length_buckets": [4, 8]})
    async with running(batcher(config, [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        lengths = [2, 6, 3, 12, 7]
        tasks = [asyncio.create_task(s.submit(tokens(n, first=10 * n))) for n in lengths]
        await until(lambda: s.inflight_count() == 6, "queued")
        gate.set()
        await asyncio.gather(head, *tasks)
    widths = sorted((b["ids"].shape[1], len(b["ids"])) for b in runtime.batches[1:])
    assert widths == [(3, 2), (7, 2), (12, 1)]


async def test_requests_with_different_dtypes_run_in_separate_batches() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    async with running(batcher(token_config(), [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        narrow = tokens(2, first=10)
        narrow = type(narrow)(inputs={k: v.astype(np.int32) for k, v in narrow.inputs.items()})
        tasks = [asyncio.create_task(s.submit(r)) for r in (tokens(2, first=20), narrow, tokens(3, first=30))]
        await until(lambda: s.inflight_count() == 4, "queued")
        gate.set()
        await asyncio.gather(head, *tasks)
    groups = sorted((b["ids"].dtype.str, tuple(first_ids(b))) for b in runtime.batches[1:])
    assert groups == sorted([(np.dtype(np.int64).str, (20, 30)), (np.dtype(np.int32).str, (10,))])


async def test_higher_priority_requests_run_first() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(max_batch_size=1, dynamic_batching={"priority_levels": 3, "default_priority": 2})
    async with running(batcher(config, [runtime]), gate) as s:
        tasks = [asyncio.create_task(s.submit(tokens(1, first=1)))]
        await started(runtime)
        tasks.append(asyncio.create_task(s.submit(tokens(1, first=2))))  # takes the prefetch slot
        await until(lambda: s.inflight_count() == 2, "prefetched")
        for first, priority in ((30, 3), (10, 1), (20, None), (11, 1), (31, 3)):
            tasks.append(asyncio.create_task(s.submit(tokens(1, first=first, priority=priority))))
            await until(lambda: s.inflight_count() == len(tasks), "queued")
        gate.set()
        await asyncio.gather(*tasks)
    assert [first_ids(b)[0] for b in runtime.batches] == [1, 2, 10, 11, 20, 30, 31]


async def test_priority_out_of_range_is_invalid() -> None:
    async with running(batcher(token_config(dynamic_batching={"priority_levels": 2}), [FakeRuntime()])) as s:
        with pytest.raises(InvalidInput, match="use 1 \\(highest\\) to 2"):
            await s.submit(tokens(2, priority=3))


async def test_full_queue_refuses_at_once_naming_the_limit() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    metrics = ServerMetrics()
    config = token_config(max_batch_size=1, dynamic_batching={"max_queue_size": 2})
    async with running(batcher(config, [runtime], metrics.for_model("tokens", "1")), gate) as s:
        tasks = [asyncio.create_task(s.submit(tokens(1, first=1)))]
        await started(runtime)
        tasks.append(asyncio.create_task(s.submit(tokens(1, first=2))))  # prefetched, not queued
        await until(lambda: s.inflight_count() == 2, "prefetched")
        tasks += [asyncio.create_task(s.submit(tokens(1, first=f))) for f in (3, 4)]
        await until(lambda: s.inflight_count() == 4, "queue full")
        with pytest.raises(Overloaded, match="max_queue_size = 2"):
            await s.submit(tokens(1, first=5))
        gate.set()
        await asyncio.gather(*tasks)
    rejected = metrics.registry.get_sample_value(
        "taskserve_rejected_requests_total", {"model": "tokens", "version": "1", "reason": "queue_full"}
    )
    assert rejected == 1
    assert not runtime.saw(lambda b: 5 in first_ids(b))


async def test_deadline_passed_while_queued_is_never_computed() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    clock = ManualClock()
    async with running(batcher(token_config(), [runtime], clock=clock), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        late = asyncio.create_task(s.submit(tokens(2, first=50, deadline=clock() + 1000)))
        fine = asyncio.create_task(s.submit(tokens(2, first=60)))
        await until(lambda: s.inflight_count() == 3, "queued")
        clock.advance(2000)
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        assert (await fine).outputs["length"][0] == 2
        await head
    assert not runtime.saw(lambda b: 50 in first_ids(b))


async def test_deadline_passed_in_a_prefetched_batch_is_never_computed() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    clock = ManualClock()
    async with running(batcher(token_config(max_batch_size=1), [runtime], clock=clock), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        late = asyncio.create_task(s.submit(tokens(2, first=50, deadline=clock() + 1000)))
        await until(lambda: s.inflight_count() == 2, "prefetched")
        clock.advance(2000)
        gate.set()
        with pytest.raises(DeadlineExceeded):
            await late
        await head
    assert not runtime.saw(lambda b: 50 in first_ids(b))


async def test_default_timeout_fails_a_queued_request_without_waiting_for_an_instance() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(dynamic_batching={"default_timeout_us": 20_000})
    async with running(batcher(config, [runtime]), gate) as s:
        # The head request has its own generous deadline, so only the default applies to the second.
        head = asyncio.create_task(s.submit(tokens(1, first=1, deadline=time.monotonic() + 600)))
        await started(runtime)
        with pytest.raises(DeadlineExceeded):
            await s.submit(tokens(2, first=50))
        assert not head.done()  # it failed while the instance was still busy
        assert s.inflight_count() == 1
        gate.set()
        await head
    assert not runtime.saw(lambda b: 50 in first_ids(b))


async def test_deadline_already_passed_is_refused_at_submit() -> None:
    clock = ManualClock()
    runtime = FakeRuntime()
    async with running(batcher(token_config(), [runtime], clock=clock)) as s:
        with pytest.raises(DeadlineExceeded):
            await s.submit(tokens(2, deadline=clock() - 1))
    assert runtime.batches == []


async def test_cancelled_caller_leaves_the_queue() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    async with running(batcher(token_config(), [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        doomed = asyncio.create_task(s.submit(tokens(2, first=50)))
        await until(lambda: s.inflight_count() == 2, "queued")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert s.inflight_count() == 1
        gate.set()
        await head
        await s.submit(tokens(2, first=60))  # still serving
    assert not runtime.saw(lambda b: 50 in first_ids(b))


async def test_cancelled_caller_in_a_prefetched_batch_is_skipped() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    async with running(batcher(token_config(max_batch_size=1), [runtime]), gate) as s:
        head = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        doomed = asyncio.create_task(s.submit(tokens(2, first=50)))
        await until(lambda: s.inflight_count() == 2, "prefetched")
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed  # the cancellation is processed before the instance thread moves on
        gate.set()
        await head
        await s.submit(tokens(2, first=60))
    assert not runtime.saw(lambda b: 50 in first_ids(b))
    assert runtime.saw(lambda b: 60 in first_ids(b))


async def test_instances_run_batches_concurrently_on_their_own_threads() -> None:
    # The barrier only opens when two infer calls are inside the runtime at once.
    shared = FakeRuntime(barrier=threading.Barrier(2, timeout=30))
    config = token_config(max_batch_size=1, instance_count=2)
    async with running(batcher(config, [shared, shared])) as s:
        results = await asyncio.gather(s.submit(tokens(2, first=1)), s.submit(tokens(3, first=2)))
    assert [r.outputs["length"][0] for r in results] == [2, 3]
    assert shared.max_active == 2
    assert len(shared.threads) == 2


async def test_stop_with_drain_finishes_queued_work_and_refuses_new() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    s = batcher(token_config(), [runtime])
    await s.start()
    head = asyncio.create_task(s.submit(tokens(1, first=1)))
    await started(runtime)
    queued = [asyncio.create_task(s.submit(tokens(2, first=f))) for f in (10, 20)]
    await until(lambda: s.inflight_count() == 3, "queued")
    stopping = asyncio.create_task(s.stop(drain=True))
    await asyncio.sleep(0)
    with pytest.raises(ModelNotReady, match="shutting down"):
        await s.submit(tokens(2))
    assert not stopping.done()
    gate.set()
    results = await asyncio.gather(head, *queued)
    await asyncio.wait_for(stopping, 30)
    await s.stop()  # idempotent
    assert [int(r.outputs["length"][0]) for r in results] == [1, 2, 2]
    assert runtime.closed
    assert s.inflight_count() == 0


async def test_stop_without_drain_fails_queued_requests() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    s = batcher(token_config(), [runtime])
    await s.start()
    head = asyncio.create_task(s.submit(tokens(1, first=1)))
    await started(runtime)
    queued = asyncio.create_task(s.submit(tokens(2, first=10)))
    await until(lambda: s.inflight_count() == 2, "queued")
    stopping = asyncio.create_task(s.stop(drain=False))
    with pytest.raises(ModelNotReady):
        await queued
    gate.set()
    assert (await head).outputs["length"][0] == 1  # the executing batch still completes
    await asyncio.wait_for(stopping, 30)
    assert not runtime.saw(lambda b: 10 in first_ids(b))


async def test_submit_before_start_is_not_ready() -> None:
    with pytest.raises(ModelNotReady, match="not started"):
        await batcher(token_config(), [FakeRuntime()]).submit(tokens(2))


async def test_runtime_failure_fails_only_that_batch() -> None:
    runtime = FakeRuntime(fail=lambda inputs: bool((inputs["ids"] == 666).any()))
    async with running(batcher(token_config(), [runtime])) as s:
        with pytest.raises(RuntimeFailure, match="ValueError: fake runtime failure"):
            await s.submit(tokens(2, first=665))
        after = await s.submit(tokens(3, first=1))
    np.testing.assert_array_equal(after.outputs["length"], [3])


async def test_model_without_batch_dimension_runs_each_request_alone_as_is() -> None:
    runtime = FakeRuntime()
    config = token_config(
        max_batch_size=0,
        inputs=[
            {"name": "ids", "datatype": "INT64", "dims": [-1, -1]},
            {"name": "mask", "datatype": "INT64", "dims": [-1, -1]},
        ],
        outputs=None,
    )
    requests = [tokens(2, first=1), tokens(5, first=2, rows=2), tokens(3, first=3)]
    async with running(batcher(config, [runtime])) as s:
        results = await asyncio.gather(*(s.submit(r) for r in requests))
    assert len(runtime.batches) == 3
    seen = sorted(runtime.batches, key=lambda b: int(b["ids"][0, 0]))
    for request, batch, result in zip(requests, seen, results, strict=False):
        np.testing.assert_array_equal(batch["ids"], request.inputs["ids"])
        np.testing.assert_array_equal(
            result.outputs["pooled"], masked_outputs(dict(request.inputs))["pooled"]
        )


async def test_metrics_record_batches_queue_time_and_pending() -> None:
    metrics = ServerMetrics()
    model = metrics.for_model("tokens", "1")
    runtime = FakeRuntime()
    async with running(batcher(token_config(), [runtime], model)) as s:
        await asyncio.gather(*(s.submit(tokens(n, rows=2)) for n in (2, 3, 4)))
    stats = model.snapshot()
    assert stats.inference_count == 6
    assert stats.execution_count == len(runtime.batches)
    assert stats.queue.count == 3
    pending = metrics.registry.get_sample_value(
        "taskserve_pending_requests", {"model": "tokens", "version": "1"}
    )
    assert pending == 0


async def test_readme_worked_example() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    config = token_config(
        max_batch_size=32,
        dynamic_batching={
            "preferred_batch_sizes": [8, 16, 32],
            "priority_levels": 2,
            "default_priority": 2,
            "length_buckets": [16, 64, 128],
        },
    )
    async with running(batcher(config, [runtime]), gate) as s:
        busy = asyncio.create_task(s.submit(tokens(1, first=1)))
        await started(runtime)
        a, b, c, d = (
            asyncio.create_task(s.submit(request))
            for request in (
                tokens(10, first=100),
                tokens(12, 11, first=200, rows=2),
                tokens(90, first=500),
                tokens(14, first=400, priority=1),
            )
        )
        await until(lambda: s.inflight_count() == 5, "queued")
        gate.set()
        results = {name: await task for name, task in zip("abcd", (a, b, c, d), strict=False)}
        await busy
    first_batch, second_batch = runtime.batches[1:]
    # D first (priority 1), then A, then B's two rows (ids from 200 and 300); C alone later.
    assert first_ids(first_batch) == [400, 100, 200, 300] and first_batch["ids"].shape == (4, 14)
    assert first_ids(second_batch) == [500] and second_batch["ids"].shape == (1, 90)
    shapes = {name: r.outputs["hidden"].shape for name, r in results.items()}
    assert shapes == {"d": (1, 14, 2), "a": (1, 10, 2), "b": (2, 12, 2), "c": (1, 90, 2)}
