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
