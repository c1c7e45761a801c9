"""Latency summaries, the window stability rule and run aggregation."""

from __future__ import annotations

import pytest

from taskserve.benchmarks.stats import LatencySummary, RunResult, Window, choose_measured, is_stable


def _window(rps: float, latency_s: float = 0.01, errors: dict[str, int] | None = None) -> Window:
    n = int(rps)
    return Window(1.0, tuple([latency_s] * n), errors or {})


def test_latency_summary_in_milliseconds() -> None:
    lat = LatencySummary.of([0.001] * 99 + [0.1])
    assert lat.p50 == pytest.approx(1.0)
    assert lat.p90 == pytest.approx(1.0)
    assert lat.max == pytest.approx(100.0)
    assert lat.mean == pytest.approx((99 * 1.0 + 100.0) / 100)
    assert 1.0 < lat.p99 <= 100.0
    assert LatencySummary.of([]).p99 == 0.0


def test_stability_needs_enough_agreeing_windows() -> None:
    assert not is_stable([_window(100)], 2, 0.05)
    assert is_stable([_window(50), _window(100), _window(103)], 2, 0.05)
    assert not is_stable([_window(100), _window(120)], 2, 0.05)
    assert is_stable([_window(100), _window(120)], 2, 0.25)


def test_stability_on_latency_for_open_loop() -> None:
    steady = [_window(100, 0.010), _window(60, 0.0101)]
    assert is_stable(steady, 2, 0.05, metric="p50")
    assert not is_stable(steady, 2, 0.05, metric="throughput")


def test_windows_where_nothing_succeeded_are_never_stable() -> None:
    failing = [_window(0, errors={"UNAVAILABLE": 9}), _window(0, errors={"UNAVAILABLE": 7})]
    assert not is_stable(failing, 2, 0.05)
    assert not is_stable([_window(0), _window(0)], 2, 0.05)
    assert not is_stable([_window(100), _window(0, errors={"UNAVAILABLE": 100})], 2, 0.5)


def test_only_stable_error_free_runs_that_served_something_back_a_verdict() -> None:
    ok = Window(1.0, (0.01,) * 50, {})
    failing = Window(1.0, (0.01,) * 50, {"UNAVAILABLE": 2}, failure_latencies_s=(0.5, 0.7))
    dead = Window(1.0, (), {"UNAVAILABLE": 9}, failure_latencies_s=(0.002,) * 9)
    assert RunResult("a", "closed", 1, 1, (ok,), (ok,), True).unusable is None
    assert "never stable" in (RunResult("a", "closed", 1, 1, (ok,), (ok,), False).unusable or "")
    with_errors = RunResult("a", "closed", 1, 1, (failing,), (failing,), True)
    assert "2 failed" in (with_errors.unusable or "")
    zero = RunResult("kserve", "closed", 1, 1, (dead,), (dead,), False)
    assert "zero throughput" in (zero.unusable or "") and zero.items_per_s == 0
    # Failures are counted and their latencies reported apart from the successes'.
    doc = with_errors.to_json()
    assert doc["failed_requests"] == 2 and doc["usable_for_verdict"] is False
    assert doc["latency_ms"]["max"] == pytest.approx(10.0)  # type: ignore[index]
    assert doc["failure_latency_ms"]["max"] == pytest.approx(700.0)  # type: ignore[index]


def test_measured_windows_are_the_stable_tail_else_all() -> None:
    windows = [_window(10), _window(100), _window(101)]
    measured, stable = choose_measured(windows, 2, 0.05)
    assert stable and measured == tuple(windows[1:])
    measured, stable = choose_measured([_window(10), _window(100)], 2, 0.05)
    assert not stable and len(measured) == 2


def test_run_result_aggregates_measured_windows() -> None:
    w1 = Window(2.0, (0.01,) * 100, {"UNAVAILABLE": 1})
    w2 = Window(2.0, (0.03,) * 100, {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1})
    run = RunResult("s", "closed", 8, 4, (w1, w2), (w1, w2), True)
    doc = run.to_json()
    assert doc["requests"] == 200
    assert doc["throughput_rps"] == pytest.approx(50.0)
    assert doc["items_per_s"] == pytest.approx(200.0)
    assert doc["errors"] == {"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}
    assert doc["latency_ms"]["max"] == pytest.approx(30.0)  # type: ignore[index]
    assert len(doc["windows"]) == 2  # type: ignore[arg-type]
