"""Run a sweep: every load point (concurrency or rate) on every server, repeated, with a progress bar.

Servers alternate at each load point (A, B, A, B, ...) so slow drift of the
machine (thermal, other tenants) spreads over all of them instead of biasing one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

from taskserve.benchmarks.loadgen import Call, WindowPlan, run_closed_loop, run_open_loop
from taskserve.benchmarks.stats import RunResult, Window, choose_measured

Mode = Literal["closed", "open"]


@dataclass(frozen=True)
class SweepTarget:
    """One server (or door) under test: its label and the call that loads it (over whatever
    transport: a gRPC channel, an HTTP client)."""

    server: str
    call: Call


async def run_sweep(
    targets: Sequence[SweepTarget],
    mode: Mode,
    loads: Sequence[float],
    plan: WindowPlan,
    *,
    repeats: int = 1,
    items_per_request: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[RunResult]:
    calls = {t.server: t.call for t in targets}
    steps = [(rep, load, t) for rep in range(repeats) for load in loads for t in targets]
    results: list[RunResult] = []
    bar = tqdm(total=len(steps), disable=not progress, unit="run", dynamic_ncols=True)
    try:
        for rep, load, target in steps:
            bar.set_description(f"{target.server} {mode} {load:g} (repeat {rep})")

            def show(w: Window) -> None:
                bar.set_postfix(
                    rps=f"{w.throughput_rps:.1f}", p50_ms=w.summary()["p50_ms"], errors=sum(w.errors.values())
                )

            extra: dict[str, float | int | str] = {}
            call = calls[target.server]
            if mode == "closed":
                windows = await run_closed_loop(call, int(load), plan, items_per_request, show)
            else:
                windows, stats = await run_open_loop(call, load, plan, items_per_request, show, seed=seed + rep)
                extra = {"client_lag_p99_ms": round(stats.lag_p99_ms(), 3), "client_shed": stats.shed}
            metric = "throughput" if mode == "closed" else "p50"
            measured, stable = choose_measured(windows, plan.stable_windows, plan.tolerance, metric)
            results.append(
                RunResult(target.server, mode, load, items_per_request, tuple(windows), measured, stable, rep, extra)
            )
            bar.update(1)
    finally:
        bar.close()
    return results
