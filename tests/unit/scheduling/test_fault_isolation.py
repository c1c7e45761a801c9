"""A batch that fails in the runtime is bisected so only the offending request fails;
cheap domain checks refuse what would break a batch before it is formed."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from taskserve.server.errors import (
    Code,
    InputRejected,
    InvalidInput,
    LimitExceeded,
    RuntimeFailure,
    SchedulingFailure,
)
from taskserve.server.runtimes.base import TensorInfo
from taskserve.server.scheduling import batcher as batcher_module
from taskserve.server.scheduling.layout import TensorLayout

from .fakes import FakeRuntime
from .harness import batcher, running, started, token_config, tokens, until

POISON = 666


def poisoned(inputs: dict[str, np.ndarray]) -> bool:
    return bool((inputs["ids"] == POISON).any())


async def _queue_behind_a_held_batch(
    runtime: FakeRuntime, gate: threading.Event, firsts: list[int]
) -> tuple[asyncio.Task[object], list[asyncio.Task[object]]]:
    """One request holds the instance; the others queue and then go as one batch."""
    s = runtime.scheduler  # type: ignore[attr-defined]
    holder: asyncio.Task[object] = asyncio.create_task(s.submit(tokens(2, first=1)))
    await started(runtime)
    waiting: list[asyncio.Task[object]] = [asyncio.create_task(s.submit(tokens(3, first=f))) for f in firsts]
    await until(lambda: s.inflight_count() == len(firsts) + 1, "requests queued")
    gate.set()
    return holder, waiting


async def test_one_poisoned_request_fails_alone_and_the_others_get_their_results() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate, fail=poisoned)
    firsts = [10, 20, 30, POISON - 1, 50, 60, 70, 80]  # POISON-1 .. POISON+1: ids 665, 666, 667
    async with running(batcher(token_config(max_batch_size=8), [runtime]), gate) as s:
        runtime.scheduler = s  # type: ignore[attr-defined]
        holder, waiting = await _queue_behind_a_held_batch(runtime, gate, firsts)
        await holder
        results = await asyncio.gather(*waiting, return_exceptions=True)
    bad = firsts.index(POISON - 1)
    for i, result in enumerate(results):
        if i == bad:
            assert isinstance(result, InputRejected), result
            assert result.code is Code.INVALID_ARGUMENT
            assert "other requests in its batch computed" in result.message
        else:
            assert not isinstance(result, BaseException), result
            np.testing.assert_array_equal(result.outputs["length"], [3])  # type: ignore[attr-defined]
    # The full batch of 8 ran first and failed; then halves, down to the offender.
    sizes = [len(b["ids"]) for b in runtime.batches]
    assert sizes[:2] == [1, 8] and sorted(sizes[2:]) == sorted([4, 4, 2, 2, 1, 1])


async def test_a_batch_where_everything_fails_is_the_servers_fault() -> None:
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate, fail=lambda inputs: len(inputs["ids"]) != 1 or inputs["ids"][0, 0] != 1)
    async with running(batcher(token_config(max_batch_size=8), [runtime]), gate) as s:
        runtime.scheduler = s  # type: ignore[attr-defined]
        holder, waiting = await _queue_behind_a_held_batch(runtime, gate, [10, 20, 30, 40])
        await holder
        results = await asyncio.gather(*waiting, return_exceptions=True)
    assert all(isinstance(r, RuntimeFailure) and r.code is Code.INTERNAL for r in results), results


async def test_a_scheduler_bug_is_internal_not_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object) -> object:
        raise RuntimeError("bug in the executor")

    monkeypatch.setattr(batcher_module, "timed_execute_batch", broken)
    gate = threading.Event()
    runtime = FakeRuntime(gate=gate)
    async with running(batcher(token_config(max_batch_size=8), [runtime]), gate) as s:
        gate.set()
        with pytest.raises(SchedulingFailure) as caught:
            await asyncio.wait_for(s.submit(tokens(3)), 30)
    assert caught.value.code is Code.INTERNAL


def _named_layout(**limits: int) -> TensorLayout:
    config = token_config(limits=limits)
    graph = [
        TensorInfo("ids", "INT64", (-1, -1), ("batch", "sequence")),
        TensorInfo("mask", "INT64", (-1, -1), ("batch", "sequence")),
    ]
    return TensorLayout.from_config(config, graph)


def test_inputs_sharing_a_named_axis_must_agree_on_its_size() -> None:
    layout = _named_layout()
    assert layout.shared_axes == (("sequence", (("ids", 0), ("mask", 0))),)
    ok = {"ids": np.ones((2, 5), np.int64), "mask": np.ones((2, 5), np.int64)}
    assert layout.describe(ok, None, 8).rows == 2
    # An empty tensor is a placeholder (a merged decoder's first-step past), not a length.
    assert layout.describe({"ids": np.ones((1, 5), np.int64), "mask": np.ones((1, 0), np.int64)}, None, 8).rows == 1
    bad = {"ids": np.ones((1, 5), np.int64), "mask": np.ones((1, 7), np.int64)}
    with pytest.raises(InvalidInput, match="share the axis 'sequence'.*ids has 5, mask has 7"):
        layout.describe(bad, None, 8)


def test_variable_dims_are_capped_by_the_configured_limit() -> None:
    layout = _named_layout(max_variable_dim=16)
    layout.describe({"ids": np.ones((1, 16), np.int64), "mask": np.ones((1, 16), np.int64)}, None, 8)
    with pytest.raises(LimitExceeded, match="size 17 .* limit of 16; .*limits.max_variable_dim"):
        layout.describe({"ids": np.ones((1, 17), np.int64), "mask": np.ones((1, 17), np.int64)}, None, 8)
