"""Results files and the recorded machine information."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from taskserve.benchmarks.machine import REPO_ROOT, machine_info
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import RunResult, Window


def _run(server: str, load: float, latency_s: float, repeat: int = 0) -> RunResult:
    w = Window(1.0, (latency_s,) * 50, {"UNAVAILABLE": 2} if server == "b" else {})
    return RunResult(server, "closed", load, 1, (w,), (w,), True, repeat)


def test_write_results_json_markdown_png(tmp_path: Path) -> None:
    runs = [
        _run("a", 1, 0.002),
        _run("b", 1, 0.004),
        _run("a", 8, 0.01),
        _run("b", 8, 0.02),
        _run("a", 8, 0.012, 1),
    ]
    paths = write_results(
        "cmp", runs, config={"model": "m"}, machine={"cpu_model": "X", "git_commit": "abc"}, out_dir=tmp_path,
        extra={"best": {"batch_size": 8}}, notes=["a note"],
    )  # fmt: skip
    assert set(paths) == {"json", "md", "png"}
    doc = json.loads(paths["json"].read_text())
    assert doc["config"] == {"model": "m"} and doc["best"] == {"batch_size": 8} and doc["notes"] == ["a note"]
    assert len(doc["runs"]) == 5 and doc["runs"][1]["errors"] == {"UNAVAILABLE": 2}
    md = paths["md"].read_text()
    assert md.count("\n| a |") == 3 and md.count("\n| b |") == 2
    assert "| b | concurrency 8 | 0 | 50.0 | 50.0 | 20.00 |" in md
    assert "- a note" in md and "abc" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_no_runs_writes_no_plot(tmp_path: Path) -> None:
    paths = write_results("empty", [], config={}, machine={}, out_dir=tmp_path)
    assert set(paths) == {"json", "md"}


def test_machine_info_records_versions_and_commit() -> None:
    info = machine_info()
    assert info["cpu_count"] and info["python"]
    packages = info["packages"]
    assert isinstance(packages, dict) and "grpcio" in packages and "numpy" in packages
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert info["git_commit"] == head
