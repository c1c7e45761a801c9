"""``taskserve-bench image-generation``: its arguments and the ratios it reports."""

from __future__ import annotations

import pytest

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.image_generation_bench import summarize
from taskserve.benchmarks.stats import RunResult, Window


def _run(server: str, mode: str, load: int, images: int, seconds: float, step_ms: float = 0.0) -> RunResult:
    window = Window(duration_s=seconds, latencies_s=tuple([seconds / images] * images), errors={})
    extra = {"step_p50_ms": step_ms, "first_progress_p50_ms": 2 * step_ms} if server == "taskserve" else {}
    return RunResult(server, mode, load, 1, (window,), (window,), True, extra=extra)


def test_parser_accepts_the_mode_and_its_defaults() -> None:
    args = build_parser().parse_args(["image-generation", "--steps", "3", "--requests", "2"])
    assert (args.command, args.steps, args.requests, args.size, args.concurrency) == ("image-generation", 3, 2, 64, 4)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["image-generation", "--scheduler", "pndm"])


def test_summary_ratios_are_medians_of_images_per_second() -> None:
    runs = [
        _run("taskserve", "sequential", 1, 8, 8.0, step_ms=90),  # 1 image/s
        _run("taskserve", "sequential", 1, 8, 4.0, step_ms=100),  # 2 images/s
        _run("taskserve", "concurrent", 4, 8, 2.0),  # 4 images/s
        _run("taskserve", "concurrent", 4, 8, 1.0),  # 8 images/s
        _run("diffusers-torch", "in-process", 1, 8, 16.0),  # 0.5 image/s
    ]
    extra, notes = summarize(runs, 4)
    ratios = extra["ratios"]
    assert isinstance(ratios, dict)
    assert ratios["sequential_images_per_s"] == 1.5 and ratios["concurrent_images_per_s"] == 6.0
    assert ratios["batching_ratio"] == 4.0 and ratios["server_vs_diffusers"] == 3.0
    assert ratios["sequential_step_p50_ms"] == 95.0
    assert "(>= 2.0: met)" in notes[0] and "(>= 1.2: met)" in notes[1]
    slow = summarize([*runs[:2], _run("taskserve", "concurrent", 4, 8, 8.0), runs[4]], 4)[1]
    assert "NOT met" in slow[0]
