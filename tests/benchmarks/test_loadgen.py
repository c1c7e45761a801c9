"""Closed- and open-loop generators driving a fake async call (no server, no timing asserts)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from taskserve.benchmarks.loadgen import WindowPlan, error_code, run_closed_loop, run_open_loop
from taskserve.clients.errors import error_for
from tests.support.waiting import other_tasks_done

PLAN = WindowPlan(warmup_s=0.05, window_s=0.1, max_windows=3, stable_windows=2, tolerance=0.05)


class FakeCall:
    """Counts concurrency; every ``fail_every``-th call raises UNAVAILABLE."""

    def __init__(self, fail_every: int = 0, delay: float = 0.002) -> None:
        self.fail_every = fail_every
        self.delay = delay
        self.active = 0
        self.peak = 0
        self.seen: list[int] = []

    async def __call__(self, i: int) -> object:
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.seen.append(i)
        try:
            await asyncio.sleep(self.delay)
            if self.fail_every and i % self.fail_every == 0:
                raise error_for(grpc.StatusCode.UNAVAILABLE, "down")
            return i
        finally:
            self.active -= 1


async def test_closed_loop_keeps_exactly_n_in_flight_and_counts_errors() -> None:
    call = FakeCall(fail_every=5)
    windows = await run_closed_loop(call, 3, PLAN)
    assert 2 <= len(windows) <= PLAN.max_windows
    assert call.peak == 3
    ok = sum(len(w.latencies_s) for w in windows)
    failed = sum(w.errors.get("UNAVAILABLE", 0) for w in windows)
    assert ok > 0 and failed > 0
    assert set().union(*(w.errors for w in windows)) == {"UNAVAILABLE"}
    # Request indices are handed out once each.
    assert len(call.seen) == len(set(call.seen))


async def test_closed_loop_stops_its_callers() -> None:
    call = FakeCall()
    await run_closed_loop(call, 2, PLAN)
    count = len(call.seen)
    # Once every task it started has ended, no caller is left to send: a fact, not a time window.
    await other_tasks_done("the closed loop's callers to end", timeout=10)
    assert len(call.seen) == count and call.active == 0


async def test_open_loop_sends_without_waiting_for_answers() -> None:
    # Answers take 50 ms, arrivals come every ~5 ms: many must be in flight at once.
    call = FakeCall(delay=0.05)
    windows, stats = await run_open_loop(call, 200.0, PLAN, seed=1)
    assert call.peak > 1
    assert sum(len(w.latencies_s) for w in windows) > 0
    assert stats.shed == 0 and stats.lags_s


async def test_open_loop_sheds_beyond_max_inflight() -> None:
    call = FakeCall(delay=0.2)
    windows, stats = await run_open_loop(call, 200.0, PLAN, max_inflight=2)
    assert call.peak <= 2
    assert stats.shed > 0
    assert sum(w.errors.get("CLIENT_SHED", 0) for w in windows) > 0


def test_error_codes_and_plan_validation() -> None:
    assert error_code(error_for(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")) == "RESOURCE_EXHAUSTED"
    assert error_code(ValueError("x")) == "ValueError"
    with pytest.raises(ValueError):
        WindowPlan(window_s=0)
    with pytest.raises(ValueError):
        WindowPlan(max_windows=2, stable_windows=3)
