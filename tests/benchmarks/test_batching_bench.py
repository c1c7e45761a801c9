"""taskserve-bench batching: the variant repository, the ratio arithmetic, and a short real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from taskserve.benchmarks.batching_bench import ratios, verdicts, write_variant_repository
from taskserve.benchmarks.cli import main as bench_main
from taskserve.benchmarks.stats import RunResult, Window
from taskserve.server.repository.config import load_model_config


def test_variant_repository_turns_batching_off_in_the_copy(demo_repository: Path, tmp_path: Path) -> None:
    repo = write_variant_repository(demo_repository / "all-MiniLM-L6-v2", "all-MiniLM-L6-v2", tmp_path)
    batched = load_model_config(repo / "all-MiniLM-L6-v2-batched")
    unbatched = load_model_config(repo / "all-MiniLM-L6-v2-unbatched")
    original = yaml.safe_load((demo_repository / "all-MiniLM-L6-v2" / "config.yaml").read_text())
    assert batched.max_batch_size == original["max_batch_size"] > 1
    assert unbatched.max_batch_size == 1
    assert unbatched.inputs == batched.inputs and unbatched.runtime == batched.runtime
    # The same file (a hard link where possible), inside the variant's own folder: the server
    # refuses model files that resolve outside the repository.
    copy = repo / "all-MiniLM-L6-v2-unbatched" / "1" / "model.onnx"
    assert not copy.is_symlink() and copy.resolve().is_relative_to(repo.resolve())
    assert copy.read_bytes() == (demo_repository / "all-MiniLM-L6-v2" / "1" / "model.onnx").read_bytes()


def _run(server: str, mode: str, load: float, latencies: list[float], seconds: float, repeat: int = 0) -> RunResult:
    window = Window(seconds, tuple(latencies), {})
    return RunResult(server, mode, load, 1, (window,), (window,), True, repeat)


def test_ratios_use_medians_over_repeats() -> None:
    bucketed = "onnxruntime in-process, length-bucketed"
    runs = [
        _run(bucketed, "in-process", 1, [0.01] * 300, 1.0),
        _run(bucketed, "in-process", 32, [0.1] * 16, 1.0),  # 16 x 32 = 512 items/s
        _run("m-batched", "closed", 32, [0.05] * 460, 1.0),
        _run("m-unbatched", "closed", 32, [0.1] * 300, 1.0),
        _run("m-batched", "closed", 1, [0.004] * 10, 1.0),
        _run("m-unbatched", "closed", 1, [0.005] * 10, 1.0),
    ]
    # in-process items/s counts rows: the 32-row run above is 16 batches of 32 rows.
    runs[1] = RunResult(bucketed, "in-process", 32, 32, runs[1].windows, runs[1].measured, True)
    # The unbucketed baseline (more padding, fewer items/s) is reported beside, never as the target's.
    plain = _run("onnxruntime in-process", "in-process", 32, [0.1] * 12, 1.0)
    runs.append(RunResult(plain.server, "in-process", 32, 32, plain.windows, plain.measured, True))
    measured = ratios(runs, "m", 32)
    assert measured["inprocess_ceiling_items_per_s"] == 512.0
    assert measured["inprocess_ceiling_unbucketed_items_per_s"] == 384.0
    assert measured["batched_c32_vs_inprocess_ceiling"] == pytest.approx(460 / 512, abs=1e-3)
    assert measured["batched_c32_vs_inprocess_ceiling_unbucketed"] == pytest.approx(460 / 384, abs=1e-3)
    assert measured["batched_vs_unbatched_c32_throughput"] == pytest.approx(460 / 300, abs=1e-3)
    assert measured["batched_vs_unbatched_c1_p50"] == pytest.approx(0.8, abs=1e-3)
    assert "met" in verdicts(measured)["batched_vs_unbatched_c1_p50"]
    assert "NOT met" in verdicts(measured)["batched_c32_vs_inprocess_ceiling"]


@pytest.mark.slow
def test_short_batching_run_writes_results(demo_repository: Path, tmp_path: Path) -> None:
    rc = bench_main([
        "batching", "--model-repository", str(demo_repository), "--repeats", "1", "--concurrency", "4",
        "--batch-sizes", "1,4", "--warmup", "0.2", "--window", "0.5", "--max-windows", "1", "--stable-windows", "1",
        "--num-requests", "16", "--out", str(tmp_path), "--name", "smoke", "--quiet", "--allow-dirty",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "smoke.json").read_text())
    assert set(doc["ratios"]) >= {"batched_c32_vs_inprocess_ceiling", "batched_vs_unbatched_c32_throughput"}
    servers = {(r["server"], r["load"]) for r in doc["runs"]}
    assert ("all-MiniLM-L6-v2-batched", 4) in servers and ("all-MiniLM-L6-v2-unbatched", 1) in servers
    assert all(r["errors"] == {} for r in doc["runs"])
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_bucketed_ceiling_batches_stay_within_one_length_bucket(demo_repository: Path) -> None:
    from taskserve.benchmarks.inprocess import InProcessModel
    from taskserve.benchmarks.payloads import build_payload

    model = InProcessModel(demo_repository / "all-MiniLM-L6-v2", instances=1)
    try:
        payload = build_payload(
            "text", model.input_specs, batch_size=1, count=32, min_tokens=4, max_tokens=60,
            model_dir=demo_repository / "all-MiniLM-L6-v2", seed=0,
        )  # fmt: skip
        edges = model.config.dynamic_batching.length_buckets
        plain = model.batches(payload.requests, 8)
        bucketed = model.batches(payload.requests, 8, bucketed=True)
    finally:
        model.close()

    def bucket(width: int) -> int:
        return next(e for e in edges if width <= e)

    # Every bucketed batch holds rows of one bucket: it is padded no wider than that bucket allows...
    for batch in bucketed:
        lengths = batch["attention_mask"].sum(axis=1)
        assert {bucket(int(n)) for n in lengths} == {bucket(int(lengths.max()))}
    # ...while stacking consecutive requests pads more tokens in all (the work the server avoids).
    def padded(batches: list[dict[str, object]]) -> int:
        return sum(int(b["attention_mask"].size - b["attention_mask"].sum()) for b in batches)  # type: ignore[attr-defined]

    assert padded(bucketed) < padded(plain)
