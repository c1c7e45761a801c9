"""The Prometheus exposition built from ModelMetrics' in-memory series."""

from __future__ import annotations

import threading
from collections.abc import Generator

import pytest
from prometheus_client import generate_latest

from taskserve.server.errors import InvalidInput
from taskserve.server.metrics import ServerMetrics

LABELS = {"model": "m", "version": "1"}


def sample(metrics: ServerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **labels})


def test_histograms_are_cumulative_with_prometheus_bucket_edges() -> None:
    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")
    # 50 µs, 100 µs (on an edge), 300 µs, 2 s, 100 s
    for ns in (50_000, 100_000, 300_000, 2_000_000_000, 100_000_000_000):
        model.request_succeeded(ns)
    name = "taskserve_request_duration_seconds"
    assert sample(metrics, f"{name}_bucket", le="0.0001") == 2  # 50 µs and exactly 100 µs (le is <=)
    assert sample(metrics, f"{name}_bucket", le="0.0005") == 3
    assert sample(metrics, f"{name}_bucket", le="2.5") == 4
    assert sample(metrics, f"{name}_bucket", le="60.0") == 4
    assert sample(metrics, f"{name}_bucket", le="+Inf") == 5
    assert sample(metrics, f"{name}_count") == 5
    assert sample(metrics, f"{name}_sum") == pytest.approx(102.00045)
    assert sample(metrics, "taskserve_request_success_total") == 5
    text = generate_latest(metrics.registry).decode()
    assert 'taskserve_request_duration_seconds_bucket{le="0.00025",model="m",version="1"} 2.0' in text
    assert "# TYPE taskserve_request_success_total counter" in text


def test_batches_failures_and_rejections_by_reason() -> None:
    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")
    model.batch_executed(8, 3, 1_000, 2_000_000, 3_000, queue_ns=[10_000, 20_000, 30_000])
    model.batch_executed(1, 1, 1_000, 1_000_000, 1_000)
    with pytest.raises(InvalidInput), model.track_request(0):
        raise InvalidInput("bad")
    model.rejected("queue_full")
    model.rejected("queue_full")
    model.set_pending(7)
    assert sample(metrics, "taskserve_inference_count_total") == 9
    assert sample(metrics, "taskserve_execution_count_total") == 2
    assert sample(metrics, "taskserve_batch_size_bucket", le="8.0") == 2
    assert sample(metrics, "taskserve_batch_size_bucket", le="4.0") == 1
    assert sample(metrics, "taskserve_queue_duration_seconds_count") == 3
    assert sample(metrics, "taskserve_queue_duration_seconds_sum") == pytest.approx(60e-6)
    assert sample(metrics, "taskserve_compute_duration_seconds_count") == 2
    assert sample(metrics, "taskserve_request_failure_total", reason="invalid_input") == 1
    assert sample(metrics, "taskserve_rejected_requests_total", reason="queue_full") == 2
    assert sample(metrics, "taskserve_pending_requests") == 7
    stats = model.snapshot()
    assert (stats.inference_count, stats.execution_count, stats.fail.count, stats.queue.count) == (9, 2, 1, 3)
    assert stats.batches[8].compute_infer.ns == 2_000_000


def test_counters_continue_across_reloads_but_statistics_restart() -> None:
    metrics = ServerMetrics()
    first = metrics.for_model("m", "1")
    first.request_succeeded(1_000)
    second = metrics.for_model("m", "1")  # the same version loaded again
    second.request_succeeded(1_000)
    assert sample(metrics, "taskserve_request_success_total") == 2
    assert second.snapshot().success.count == 1


def test_concurrent_updates_are_not_lost() -> None:
    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")

    def work() -> None:
        for _ in range(5_000):
            model.request_succeeded(1_000)
            model.stage("encode", 1_000)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sample(metrics, "taskserve_request_success_total") == 20_000
    assert sample(metrics, "taskserve_stage_duration_seconds_count", stage="encode") == 20_000


def test_events_fold_on_their_own_when_nobody_reads() -> None:
    # A server nobody scrapes must not hold every request's event forever.
    from taskserve.server import metrics as metrics_module

    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")
    events = metrics_module._FOLD_EVERY * 3 + 7
    for i in range(events):
        model.request_succeeded(1_000 + i, encode_ns=500)
        assert len(model._events) < metrics_module._FOLD_EVERY
    stats = model.snapshot()
    assert stats.success.count == events
    assert stats.success.ns == sum(1_000 + i for i in range(events))
    assert stats.last_inference_ms > 0
    assert sample(metrics, "taskserve_stage_duration_seconds_count", stage="encode") == events


def test_unexpected_errors_count_as_internal_failures() -> None:
    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")
    model.request_raised(ValueError("a bug"), 1_000)
    model.request_raised(InvalidInput("bad"), 1_000)
    model.request_raised(KeyboardInterrupt(), 1_000)  # not a request failure: the process is stopping
    assert sample(metrics, "taskserve_request_failure_total", reason="internal") == 1
    assert sample(metrics, "taskserve_request_failure_total", reason="invalid_input") == 1
    assert model.snapshot().fail.count == 2


def test_a_stream_closed_before_its_end_counts_as_cancelled() -> None:
    """A streaming handler closed at its yield (the client left while an answer was being
    written, or stopped reading) sees GeneratorExit: a cancel, not a request counted nowhere."""
    metrics = ServerMetrics()
    model = metrics.for_model("m", "1")

    def stream() -> Generator[int, None, None]:
        with model.track_request(0):
            yield 1
            yield 2

    chunks = stream()
    next(chunks)
    chunks.close()
    assert sample(metrics, "taskserve_request_failure_total", reason="cancelled") == 1
    assert model.snapshot().fail.count == 1
