"""Every Prometheus metric the server exports, declared in one place.

One prefix (``taskserve_``), shared labels (``model``, ``version``). Each
model version gets a ``ModelMetrics`` that records into Prometheus and into
the in-memory ``ModelStatistics`` the v2 ModelStatistics RPC reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from taskserve.server.errors import TaskServeError

# Latency buckets from 100 µs to 60 s: serving latencies span that range.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class ServerMetrics:
    """The metric families, registered on one registry (a fresh one per server in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        labels = ("model", "version")
        self.request_success = Counter(
            "taskserve_request_success", "Requests that succeeded", labels, registry=r
        )
        self.request_failure = Counter(
            "taskserve_request_failure", "Requests that failed, by reason", (*labels, "reason"), registry=r
        )
        self.inference_count = Counter(
            "taskserve_inference_count", "Inferences performed (batch rows)", labels, registry=r
        )
        self.execution_count = Counter(
            "taskserve_execution_count", "Runtime executions (batches)", labels, registry=r
        )
        self.request_duration = Histogram(
            "taskserve_request_duration_seconds", "End-to-end request time in the server",
            labels, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_duration = Histogram(
            "taskserve_queue_duration_seconds", "Time a request waited in the batcher's queue",
            labels, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_duration = Histogram(
            "taskserve_compute_duration_seconds", "Runtime execution time of a batch",
            labels, buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_duration = Histogram(
            "taskserve_stage_duration_seconds", "Time per request stage (preprocess, postprocess, encode)",
            (*labels, "stage"), buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "taskserve_batch_size", "Rows per executed batch", labels, buckets=_BATCH_BUCKETS, registry=r
        )
        self.pending_requests = Gauge(
            "taskserve_pending_requests", "Requests queued or executing", labels, registry=r
        )
        self.rejected_requests = Counter(
            "taskserve_rejected_requests", "Requests the batcher refused or dropped, by reason",
            (*labels, "reason"), registry=r,
        )  # fmt: skip
        self.model_load_duration = Gauge(
            "taskserve_model_load_duration_seconds", "Time the last load of a model took (load plus warmup)",
            labels, registry=r,
        )  # fmt: skip
        self.model_ready = Gauge("taskserve_model_ready", "1 when the model version is ready", labels, registry=r)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStatistics:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    """Cumulative statistics in the shape of the v2 ModelStatistics message."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStatistics] = field(default_factory=dict)


class ModelMetrics:
    """Records one model version's events. Thread-safe: batches finish on executor threads.

    The labelled children are looked up once here: ``labels()`` takes a lock and
    builds a key on every call, which adds up at thousands of requests per second.
    """

    def __init__(self, metrics: ServerMetrics, model: str, version: str) -> None:
        self._m = metrics
        self._labels = (model, version)
        self._lock = threading.Lock()
        self.statistics = ModelStatistics()
        labels = self._labels
        self._success = metrics.request_success.labels(*labels)
        self._request_duration = metrics.request_duration.labels(*labels)
        self._queue_duration = metrics.queue_duration.labels(*labels)
        self._compute_duration = metrics.compute_duration.labels(*labels)
        self._batch_size = metrics.batch_size.labels(*labels)
        self._inference_count = metrics.inference_count.labels(*labels)
        self._execution_count = metrics.execution_count.labels(*labels)
        self._pending = metrics.pending_requests.labels(*labels)
        self._stages: dict[str, Any] = {}

    def request_succeeded(self, duration_ns: int) -> None:
        self._success.inc()
        self._request_duration.observe(duration_ns / 1e9)
        with self._lock:
            self.statistics.success.add(duration_ns)
            self.statistics.last_inference_ms = int(time.time() * 1000)

    @contextlib.contextmanager
    def track_request(self, started_ns: int) -> Iterator[None]:
        """Count the request wrapped in this block as a success, or as a failure by reason."""
        try:
            yield
        except TaskServeError as err:
            self.request_failed(err.reason, time.perf_counter_ns() - started_ns)
            raise
        except asyncio.CancelledError:
            self.request_failed("cancelled", time.perf_counter_ns() - started_ns)
            raise
        self.request_succeeded(time.perf_counter_ns() - started_ns)

    def request_failed(self, reason: str, duration_ns: int) -> None:
        self._m.request_failure.labels(*self._labels, reason).inc()
        with self._lock:
            self.statistics.fail.add(duration_ns)

    def stage(self, stage: str, duration_ns: int) -> None:
        child = self._stages.get(stage)
        if child is None:
            child = self._stages[stage] = self._m.stage_duration.labels(*self._labels, stage)
        child.observe(duration_ns / 1e9)

    def queued(self, wait_ns: int) -> None:
        self._queue_duration.observe(wait_ns / 1e9)
        with self._lock:
            self.statistics.queue.add(wait_ns)

    def batch_executed(self, batch_size: int, requests: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """A batch of ``batch_size`` rows from ``requests`` requests ran; times per stage."""
        self._batch_size.observe(batch_size)
        self._compute_duration.observe((input_ns + infer_ns + output_ns) / 1e9)
        self._inference_count.inc(batch_size)
        self._execution_count.inc()
        with self._lock:
            s = self.statistics
            s.compute_input.add(input_ns, requests)
            s.compute_infer.add(infer_ns, requests)
            s.compute_output.add(output_ns, requests)
            s.inference_count += batch_size
            s.execution_count += 1
            b = s.batches.setdefault(batch_size, BatchStatistics())
            b.compute_input.add(input_ns)
            b.compute_infer.add(infer_ns)
            b.compute_output.add(output_ns)

    def rejected(self, reason: str) -> None:
        self._m.rejected_requests.labels(*self._labels, reason).inc()

    def set_pending(self, count: int) -> None:
        self._pending.set(count)

    def loaded(self, seconds: float) -> None:
        self._m.model_load_duration.labels(*self._labels).set(seconds)

    def set_ready(self, ready: bool) -> None:
        self._m.model_ready.labels(*self._labels).set(1 if ready else 0)

    def snapshot(self) -> ModelStatistics:
        """A consistent copy for the ModelStatistics RPC."""
        import copy

        with self._lock:
            return copy.deepcopy(self.statistics)
