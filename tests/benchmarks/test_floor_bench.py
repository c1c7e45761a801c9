"""taskserve-bench floor: the tiny model it serves and the ratio it reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taskserve.benchmarks.floor_bench import MODEL, p50_ratio, write_tiny_model
from taskserve.benchmarks.stats import RunResult, Window
from taskserve.server.repository.config import load_model_config
from taskserve.server.runtimes.onnx import OnnxRuntime


def test_tiny_model_is_a_valid_batched_entry(tmp_path: Path) -> None:
    entry = write_tiny_model(tmp_path)
    config = load_model_config(entry)
    assert config.name == MODEL and config.max_batch_size == 8
    runtime = OnnxRuntime(entry / "1" / "model.onnx", config)
    runtime.load()
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(runtime.infer({"x": x})["y"], 2 * x + 1)


def _run(server: str, p50_s: float) -> RunResult:
    window = Window(1.0, (p50_s,) * 5, {})
    return RunResult(server, "closed", 1, 1, (window,), (window,), True)


def test_ratio_is_the_median_p50_of_taskserve_over_echo() -> None:
    runs = [_run("taskserve", 0.0006), _run("echo", 0.0004), _run("taskserve", 0.0009), _run("echo", 0.0005)]
    ratio = p50_ratio(runs)
    assert ratio["taskserve_p50_ms"] == pytest.approx(0.75)
    assert ratio["echo_p50_ms"] == pytest.approx(0.45)
    assert ratio["p50_ratio"] == pytest.approx(0.75 / 0.45, abs=1e-3)


def _peer_run(server: str, repeat: int, items_per_s: float, p99_s: float) -> RunResult:
    slow = int(items_per_s) // 20  # the slowest 5 %: they set the p99
    window = Window(1.0, (0.01,) * (int(items_per_s) - slow) + (p99_s,) * slow, {})
    return RunResult(server, "closed", 32, 1, (window,), (window,), True, repeat=repeat)


def test_peer_ratios_pair_servers_within_each_repeat() -> None:
    from taskserve.benchmarks.peer_summary import peer_ratios, summarize

    runs = [
        _peer_run("taskserve", 0, 600, 0.05), _peer_run("kserve", 0, 400, 0.2),
        _peer_run("taskserve", 1, 300, 0.05), _peer_run("kserve", 1, 250, 0.2),  # a slow minute for both
        _peer_run("taskserve", 2, 500, 0.05), _peer_run("kserve", 2, 300, 0.2),
    ]  # fmt: skip
    r = peer_ratios(runs)["kserve @ 32"]
    assert r.repeats == 3
    assert r.throughput_ratio_paired_median == pytest.approx(1.5)  # median of 1.5, 1.2, 1.667
    assert r.throughput_ratio_of_medians == pytest.approx(500 / 300, abs=1e-3)
    assert (r.taskserve_p99_ms or 0) < (r.peer_p99_ms or 0)
    _, lines = summarize(runs)
    assert ">= 1.5: met)" in lines[0] and "(lower)" in lines[0]


def test_verdicts_come_only_from_stable_error_free_pairs_and_a_dead_peer_is_an_error() -> None:
    from taskserve.benchmarks.peer_summary import peer_ratios, summarize

    dead = Window(1.0, (), {"UNAVAILABLE": 40}, failure_latencies_s=(0.001,) * 40)
    flaky = Window(1.0, (0.01,) * 300, {"DEADLINE_EXCEEDED": 3}, failure_latencies_s=(5.0,) * 3)
    runs = [
        _peer_run("taskserve", 0, 600, 0.05), RunResult("mlserver", "closed", 32, 1, (dead,), (dead,), False, 0),
        _peer_run("taskserve", 1, 600, 0.05), RunResult("mlserver", "closed", 32, 1, (flaky,), (flaky,), True, 1),
        _peer_run("taskserve", 0, 600, 0.05), _peer_run("kserve-tuned", 0, 500, 0.2),
    ]  # fmt: skip
    r = peer_ratios(runs)["mlserver @ 32"]
    assert r.usable_repeats == 0 and r.peer_failed == 43 and r.peer_zero_throughput is True
    assert r.throughput_ratio_paired_median is None
    _, lines = summarize(runs)
    # The tuned peer is the headline and comes first; the dead peer is shown, as an error, with no verdict.
    assert lines[0].startswith("taskserve / kserve-tuned @ 32 (headline")
    assert "no verdict" in lines[1] and "zero throughput" in lines[1] and "ERROR: mlserver served nothing" in lines[1]


def test_floor_reports_both_paths_and_withholds_a_verdict_on_errors() -> None:
    from taskserve.benchmarks.floor_bench import summarize

    failing = Window(1.0, (0.0007,) * 5, {"UNAVAILABLE": 1}, failure_latencies_s=(0.002,))
    runs = [
        _run("taskserve", 0.0005), _run("echo", 0.0004),
        RunResult("taskserve-threaded", "closed", 1, 1, (failing,), (failing,), True),
    ]  # fmt: skip
    extra, lines = summarize(runs)
    assert "inline path" in lines[0] and "met" in lines[0]
    assert "threaded path" in lines[1] and "no verdict" in lines[1] and "1 failed" in lines[1]
    assert set(extra["ratios"]) == {"taskserve", "taskserve-threaded"}  # type: ignore[arg-type]
