"""Load generators: closed loop (N callers back to back) and open loop (Poisson arrivals).

Both drive an async ``call(i)`` that sends request ``i`` and raises on failure,
and measure in windows after a warm-up until the throughput of consecutive
windows agrees (or a maximum number of windows passed).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import grpc.aio
import numpy as np

from taskserve.benchmarks.stats import Window, is_stable
from taskserve.clients.errors import TaskServeError

Call = Callable[[int], Awaitable[object]]
OnWindow = Callable[[Window], None]


@dataclass(frozen=True)
class WindowPlan:
    """How long to warm up and measure, and when a measurement counts as settled."""

    warmup_s: float = 2.0
    window_s: float = 5.0
    max_windows: int = 6
    # This many consecutive windows must agree within ``tolerance`` (relative throughput).
    stable_windows: int = 2
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.window_s <= 0 or self.warmup_s < 0:
            raise ValueError("window_s must be positive and warmup_s non-negative")
        if not 1 <= self.stable_windows <= self.max_windows:
            raise ValueError("stable_windows must be between 1 and max_windows")


def error_code(err: BaseException) -> str:
    """The gRPC status name of a failed call, else the exception's type name."""
    if isinstance(err, TaskServeError):
        return err.code.name
    if isinstance(err, grpc.aio.AioRpcError):
        return err.code().name
    if isinstance(err, grpc.Call):
        return err.code().name
    return type(err).__name__


class Recorder:
    """Latencies and errors of completed calls since the last ``take``; loop-thread only."""

    def __init__(self, items_per_request: int = 1) -> None:
        self.items_per_request = items_per_request
        self._latencies: list[float] = []
        self._errors: Counter[str] = Counter()
        self._failure_latencies: list[float] = []
        self._since = time.perf_counter()

    def ok(self, latency_s: float) -> None:
        self._latencies.append(latency_s)

    def fail(self, code: str, latency_s: float | None = None) -> None:
        """A failed call; ``latency_s`` (how long it took to fail) is kept apart from the successes'."""
        self._errors[code] += 1
        if latency_s is not None:
            self._failure_latencies.append(latency_s)

    def take(self) -> Window:
        """Close the current window and start the next one."""
        now = time.perf_counter()
        window = Window(
            now - self._since, tuple(self._latencies), dict(self._errors), self.items_per_request,
            tuple(self._failure_latencies),
        )  # fmt: skip
        self._latencies, self._errors, self._failure_latencies, self._since = [], Counter(), [], now
        return window


async def measure_windows(
    rec: Recorder, plan: WindowPlan, on_window: OnWindow | None = None, metric: str = "throughput"
) -> list[Window]:
    """Warm up, then take windows until stable or ``max_windows``; the load runs meanwhile."""
    await asyncio.sleep(plan.warmup_s)
    rec.take()  # drop the warm-up
    windows: list[Window] = []
    while len(windows) < plan.max_windows:
        await asyncio.sleep(plan.window_s)
        windows.append(rec.take())
        if on_window is not None:
            on_window(windows[-1])
        if is_stable(windows, plan.stable_windows, plan.tolerance, metric):
            break
    return windows


async def _timed(rec: Recorder, call: Call, i: int, since: float) -> None:
    """One call, recorded with its latency from ``since``; every failure is data, counted by status."""
    try:
        await call(i)
    except Exception as err:  # noqa: BLE001
        rec.fail(error_code(err), time.perf_counter() - since)
    else:
        rec.ok(time.perf_counter() - since)


async def _stop(tasks: set[asyncio.Task[None]] | list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def run_closed_loop(
    call: Call,
    concurrency: int,
    plan: WindowPlan,
    items_per_request: int = 1,
    on_window: OnWindow | None = None,
) -> list[Window]:
    """``concurrency`` callers, each sending its next request as soon as the previous one answered."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    rec = Recorder(items_per_request)
    counter = itertools.count()

    async def caller() -> None:
        while True:
            await _timed(rec, call, next(counter), time.perf_counter())

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    try:
        return await measure_windows(rec, plan, on_window)
    finally:
        await _stop(tasks)


@dataclass
class OpenLoopStats:
    """How far behind schedule the generator sent (the client's own limit) and what it shed."""

    lags_s: list[float]
    shed: int = 0

    def lag_p99_ms(self) -> float:
        return float(np.percentile(self.lags_s, 99) * 1000) if self.lags_s else 0.0


async def run_open_loop(
    call: Call,
    rate: float,
    plan: WindowPlan,
    items_per_request: int = 1,
    on_window: OnWindow | None = None,
    seed: int = 0,
    max_inflight: int = 4096,
) -> tuple[list[Window], OpenLoopStats]:
    """Requests arrive as a Poisson process at ``rate`` per second, whatever the server's pace.

    Latency is measured from each request's scheduled time, so a client or server
    that falls behind shows up in the latency instead of silently lowering the load."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    rec = Recorder(items_per_request)
    rng = np.random.default_rng(seed)
    stats = OpenLoopStats(lags_s=[])
    inflight: set[asyncio.Task[None]] = set()

    async def generator() -> None:
        scheduled = time.perf_counter()
        for i in itertools.count():
            scheduled += float(rng.exponential(1.0 / rate))
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            stats.lags_s.append(max(0.0, time.perf_counter() - scheduled))
            if len(inflight) >= max_inflight:
                stats.shed += 1
                rec.fail("CLIENT_SHED")
                continue
            task = asyncio.create_task(_timed(rec, call, i, scheduled))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

    gen = asyncio.create_task(generator())
    try:
        windows = await measure_windows(rec, plan, on_window, metric="p50")
    finally:
        await _stop([gen])
        await _stop(set(inflight))
    return windows, stats
