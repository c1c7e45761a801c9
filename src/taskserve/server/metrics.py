"""Every Prometheus metric the server exports, declared in one place.

One prefix (``taskserve_``), shared labels (``model``, ``version``). Each
model version gets a ``ModelMetrics`` that records into plain in-memory
series and into the ``ModelStatistics`` the v2 ModelStatistics RPC reports.

Why not prometheus_client's Counter/Histogram objects: a request touched ~10 of
them, each taking its own lock and checking its state, which measured ~10 µs per
request on this machine, a fifth of the whole per-request budget of a tiny model.
Even one lock and a few histogram updates per event cost ~14 µs per request in a
running server (cold caches between requests make every line dear). So the
request path only appends an event to a deque (atomic, no lock); events are folded
into the numbers in bulk: when /metrics is scraped, when ModelStatistics is read,
and every ``_FOLD_EVERY`` events, which bounds the memory they hold. Readers
therefore always see every event recorded before them.
The per-GPU ``taskserve_gpu_*`` families come from NVML, read at scrape time by
the collector in ``gpu_metrics.py`` on the same registry.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from taskserve.server.errors import TaskServeError

# Latency buckets from 100 µs to 60 s: serving latencies span that range.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LABELS = ["model", "version"]
# Recorded events a series holds before the recorder folds them itself. Small: events
# that live long get promoted to the collector's oldest generation, which makes full
# collections more frequent; 256 events fold in ~0.15 ms.
_FOLD_EVERY = 256
# A cancel this close to the request's deadline is the deadline (clocks of client and server differ).
_DEADLINE_SLACK_S = 0.005


class _Histogram:
    """Bucket counts (non-cumulative; the last slot is +Inf) and the sum. Not locked: its owner locks."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le is <=).
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def exposition(self) -> tuple[list[tuple[str, float]], float]:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self.bounds, self.counts, strict=False):
            running += count
            buckets.append((_format_bound(bound), running))
        buckets.append(("+Inf", running + self.counts[-1]))
        return buckets, self.total


def _format_bound(bound: float) -> str:
    # The same text prometheus_client's own histograms write (le="0.0001", le="1.0").
    return repr(float(bound))


class _Series:
    """One model version's numbers behind every family. Shared by successive
    ``ModelMetrics`` of the same labels, so counters keep counting across reloads."""

    def __init__(self, created: float) -> None:
        self.lock = threading.Lock()
        self.created = created
        self.success = 0
        self.failure: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.inference_count = 0
        self.execution_count = 0
        self.request = _Histogram(_LATENCY_BUCKETS)
        self.queue = _Histogram(_LATENCY_BUCKETS)
        self.compute = _Histogram(_LATENCY_BUCKETS)
        self.batch_size = _Histogram(_BATCH_BUCKETS)
        self.stages: dict[str, _Histogram] = {}
        self.pending = 0
        # The generation engine's numbers (``generation_scheduler.py``); None until it reports.
        self.first_token = _Histogram(_LATENCY_BUCKETS)
        self.inter_token = _Histogram(_LATENCY_BUCKETS)
        self.generated_tokens = 0
        self.generation: tuple[int, int, float] | None = None
        # The engine's prefix cache: sequences admitted with it on, those that reused a cached
        # prefix, the prompt positions they did not compute; idle slots holding one (None: off).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prefix_reused_tokens = 0
        self.prefix_cached_slots: int | None = None
        # The same requests again, by the door they came through (grpc, http): durations,
        # outcomes ("success" or the failure reason) and time to a stream's first chunk.
        self.door_request: dict[str, _Histogram] = {}
        self.door_outcome: dict[tuple[str, str], int] = {}
        self.door_first_chunk: dict[str, _Histogram] = {}
        self.load_seconds: float | None = None
        self.ready: int | None = None
        # (apply, payload) pairs recorded on the request path, not yet in the numbers above.
        self.events: deque[tuple[Callable[[Any], None], Any]] = deque()

    def fold(self) -> None:
        """Apply every recorded event. The caller holds ``lock``; recorders keep
        appending meanwhile (deque appends and pops are atomic), and what they
        append while this runs is folded too."""
        pop = self.events.popleft
        while True:
            try:
                apply, payload = pop()
            except IndexError:
                return
            apply(payload)


class ServerMetrics(Collector):
    """The metric families, exported from one registry (a fresh one per server in tests)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._series: dict[tuple[str, str], _Series] = {}
        self._lock = threading.Lock()
        self.registry.register(self)

    def for_model(self, model: str, version: str) -> ModelMetrics:
        with self._lock:
            series = self._series.get((model, version))
            if series is None:
                series = self._series[(model, version)] = _Series(time.time())
        return ModelMetrics(series)

    def forget(self, model: str, version: str | None = None, keep: Iterable[str] = ()) -> None:
        """Drop the series of a model's versions that no longer serve (all of them, or
        ``version``; never those in ``keep``), so /metrics stops reporting them."""
        kept = set(keep)
        with self._lock:
            for key in [k for k in self._series if k[0] == model]:
                if (version is None or key[1] == version) and key[1] not in kept:
                    del self._series[key]

    @staticmethod
    def _door_families(items: list[tuple[tuple[str, str], _Series]]) -> Iterable[Metric]:
        """The request families by protocol. Separate families, so the label sets of the
        existing ones (and every query and dashboard built on them) stay as they were."""
        labels = [*_LABELS, "protocol"]
        outcomes = CounterMetricFamily(
            "taskserve_protocol_requests", "Requests by protocol and outcome (success or the failure reason)",
            labels=[*labels, "outcome"],
        )  # fmt: skip
        durations = HistogramMetricFamily(
            "taskserve_protocol_request_duration_seconds", "End-to-end request time by protocol", labels=labels
        )
        first_chunk = HistogramMetricFamily(
            "taskserve_protocol_time_to_first_chunk_seconds",
            "Streamed generation: time from a request's arrival to its first text chunk, by protocol",
            labels=labels,
        )
        for (model, version), s in items:
            with s.lock:
                s.fold()
                for (protocol, outcome), count in sorted(s.door_outcome.items()):
                    outcomes.add_metric([model, version, protocol, outcome], count, created=s.created)
                for family, hists in ((durations, s.door_request), (first_chunk, s.door_first_chunk)):
                    for protocol, hist in sorted(hists.items()):
                        buckets, total = hist.exposition()
                        family.add_metric([model, version, protocol], buckets, total)
        yield from (outcomes, durations, first_chunk)

    def describe(self) -> Iterable[Metric]:
        return ()  # families are only known at scrape time; nothing to check at register()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            items = list(self._series.items())
        counters = {
            "request_success": CounterMetricFamily(
                "taskserve_request_success", "Requests that succeeded", labels=_LABELS
            ),
            "inference_count": CounterMetricFamily(
                "taskserve_inference_count", "Inferences performed (batch rows)", labels=_LABELS
            ),
            "execution_count": CounterMetricFamily(
                "taskserve_execution_count", "Runtime executions (batches)", labels=_LABELS
            ),
        }
        failure = CounterMetricFamily(
            "taskserve_request_failure", "Requests that failed, by reason", labels=[*_LABELS, "reason"]
        )
        rejected = CounterMetricFamily(
            "taskserve_rejected_requests",
            "Requests the batcher refused or dropped, by reason",
            labels=[*_LABELS, "reason"],
        )
        histograms = {
            "request": HistogramMetricFamily(
                "taskserve_request_duration_seconds", "End-to-end request time in the server", labels=_LABELS
            ),
            "queue": HistogramMetricFamily(
                "taskserve_queue_duration_seconds", "Time a request waited in the batcher's queue", labels=_LABELS
            ),
            "compute": HistogramMetricFamily(
                "taskserve_compute_duration_seconds", "Runtime execution time of a batch", labels=_LABELS
            ),
            "batch_size": HistogramMetricFamily("taskserve_batch_size", "Rows per executed batch", labels=_LABELS),
        }
        stages = HistogramMetricFamily(
            "taskserve_stage_duration_seconds",
            "Time per request stage (preprocess, postprocess, encode)",
            labels=[*_LABELS, "stage"],
        )
        pending = GaugeMetricFamily("taskserve_pending_requests", "Requests queued or executing", labels=_LABELS)
        load = GaugeMetricFamily(
            "taskserve_model_load_duration_seconds",
            "Time the last load of a model took (load plus warmup)",
            labels=_LABELS,
        )
        ready = GaugeMetricFamily("taskserve_model_ready", "1 when the model version is ready", labels=_LABELS)
        ttft = HistogramMetricFamily(
            "taskserve_time_to_first_token_seconds",
            "Generation engine: time from a sequence's arrival to its first token",
            labels=_LABELS,
        )
        itl = HistogramMetricFamily(
            "taskserve_inter_token_latency_seconds",
            "Generation engine: time between consecutive tokens of one sequence",
            labels=_LABELS,
        )
        generated = CounterMetricFamily(
            "taskserve_generated_tokens", "Generation engine: tokens generated", labels=_LABELS
        )
        running = GaugeMetricFamily(
            "taskserve_running_sequences", "Generation engine: sequences holding a cache slot", labels=_LABELS
        )
        waiting = GaugeMetricFamily(
            "taskserve_waiting_sequences", "Generation engine: sequences waiting for a slot", labels=_LABELS
        )
        occupancy = GaugeMetricFamily(
            "taskserve_kv_cache_occupancy",
            "Generation engine: cached positions over the positions all slots hold (0..1)",
            labels=_LABELS,
        )
        prefix = {
            "queries": CounterMetricFamily(
                "taskserve_prefix_cache_queries",
                "Generation engine: sequences admitted with the prefix cache on",
                labels=_LABELS,
            ),
            "hits": CounterMetricFamily(
                "taskserve_prefix_cache_hits",
                "Generation engine: sequences that started from a cached prompt prefix",
                labels=_LABELS,
            ),
            "tokens": CounterMetricFamily(
                "taskserve_prefix_cache_reused_tokens",
                "Generation engine: prompt tokens taken from the prefix cache instead of computed",
                labels=_LABELS,
            ),
        }
        cached_slots = GaugeMetricFamily(
            "taskserve_prefix_cache_slots",
            "Generation engine: idle cache slots holding a reusable prefix (evicted first when slots run out)",
            labels=_LABELS,
        )
        for (model, version), s in items:
            labels = [model, version]
            with s.lock:  # one consistent reading per series
                s.fold()
                counters["request_success"].add_metric(labels, s.success, created=s.created)
                counters["inference_count"].add_metric(labels, s.inference_count, created=s.created)
                counters["execution_count"].add_metric(labels, s.execution_count, created=s.created)
                for reason, count in sorted(s.failure.items()):
                    failure.add_metric([*labels, reason], count, created=s.created)
                for reason, count in sorted(s.rejected.items()):
                    rejected.add_metric([*labels, reason], count, created=s.created)
                for name, hist in (
                    ("request", s.request),
                    ("queue", s.queue),
                    ("compute", s.compute),
                    ("batch_size", s.batch_size),
                ):
                    buckets, total = hist.exposition()
                    histograms[name].add_metric(labels, buckets, total)
                for stage, hist in sorted(s.stages.items()):
                    buckets, total = hist.exposition()
                    stages.add_metric([*labels, stage], buckets, total)
                pending.add_metric(labels, s.pending)
                if s.load_seconds is not None:
                    load.add_metric(labels, s.load_seconds)
                if s.ready is not None:
                    ready.add_metric(labels, s.ready)
                if s.generation is not None:
                    for family, hist in ((ttft, s.first_token), (itl, s.inter_token)):
                        buckets, total = hist.exposition()
                        family.add_metric(labels, buckets, total)
                    generated.add_metric(labels, s.generated_tokens, created=s.created)
                    running.add_metric(labels, s.generation[0])
                    waiting.add_metric(labels, s.generation[1])
                    occupancy.add_metric(labels, s.generation[2])
                if s.prefix_cached_slots is not None:
                    prefix["queries"].add_metric(labels, s.prefix_queries, created=s.created)
                    prefix["hits"].add_metric(labels, s.prefix_hits, created=s.created)
                    prefix["tokens"].add_metric(labels, s.prefix_reused_tokens, created=s.created)
                    cached_slots.add_metric(labels, s.prefix_cached_slots)
        yield from counters.values()
        yield failure
        yield from self._door_families(items)
        yield from histograms.values()
        yield stages
        yield pending
        yield rejected
        yield load
        yield ready
        yield from (ttft, itl, generated, running, waiting, occupancy)
        yield from prefix.values()
        yield cached_slots


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

    The frequent events (request done, batch executed, stage timed) are appended
    to the series' event deque and folded later into both the Prometheus numbers
    and the v2 statistics of this load of the model; rare ones (failures,
    rejections) update the numbers at once under the series lock.
    """

    def __init__(self, series: _Series) -> None:
        self._s = series
        self._lock = series.lock
        self._events = series.events
        self.statistics = ModelStatistics()
        # Bound once: each event stores its fold function, and binding a method costs an allocation.
        self._apply_success = self._fold_success
        self._apply_batch = self._fold_batch
        self._apply_stage = self._fold_stage
        self._apply_token = self._fold_token
        self._apply_first_chunk = self._fold_first_chunk

    def _record(self, apply: Callable[[Any], None], payload: Any) -> None:
        events = self._events
        events.append((apply, payload))
        if len(events) >= _FOLD_EVERY:
            with self._lock:
                self._s.fold()

    def request_succeeded(self, duration_ns: int, encode_ns: int | None = None, protocol: str = "grpc") -> None:
        """A request finished; ``encode_ns`` (optional) is its "encode" stage, recorded
        in the same event because the v2 front end times both for every request."""
        # The wall clock is read now: v2's last_inference is when the request finished.
        self._record(self._apply_success, (duration_ns, time.time_ns(), encode_ns, protocol))

    def _fold_success(self, payload: tuple[int, int, int | None, str]) -> None:
        duration_ns, finished_ns, encode_ns, protocol = payload
        if encode_ns is not None:
            self._fold_stage(("encode", encode_ns))
        s = self._s
        s.success += 1
        s.request.observe(duration_ns / 1e9)
        self._fold_door(protocol, "success", duration_ns)
        success = self.statistics.success
        success.count += 1
        success.ns += duration_ns
        # Milliseconds since the epoch, as v2 wants.
        self.statistics.last_inference_ms = max(self.statistics.last_inference_ms, finished_ns // 1_000_000)

    def _fold_door(self, protocol: str, outcome: str, duration_ns: int) -> None:
        s = self._s
        hist = s.door_request.get(protocol)
        if hist is None:
            hist = s.door_request[protocol] = _Histogram(_LATENCY_BUCKETS)
        hist.observe(duration_ns / 1e9)
        key = (protocol, outcome)
        s.door_outcome[key] = s.door_outcome.get(key, 0) + 1

    def track_request(self, started_ns: int, deadline: float | None = None, protocol: str = "grpc") -> _RequestTracker:
        """Count the request wrapped in this block as a success, or as a failure by reason.
        ``deadline`` (monotonic) tells a client's deadline from its cancelling; ``protocol``:
        the door it came through (grpc, http)."""
        return _RequestTracker(self, started_ns, deadline, protocol)

    def first_chunk(self, protocol: str, seconds: float) -> None:
        """A streamed generation sent its first text chunk ``seconds`` after the request arrived."""
        self._record(self._apply_first_chunk, (protocol, seconds))

    def first_chunk_timer(self, protocol: str, started_ns: int) -> Callable[[], None]:
        """A callable recording the time from ``started_ns`` (perf_counter_ns) to its call."""
        return lambda: self.first_chunk(protocol, (time.perf_counter_ns() - started_ns) / 1e9)

    def _fold_first_chunk(self, payload: tuple[str, float]) -> None:
        protocol, seconds = payload
        hists = self._s.door_first_chunk
        hist = hists.get(protocol)
        if hist is None:
            hist = hists[protocol] = _Histogram(_LATENCY_BUCKETS)
        hist.observe(seconds)

    def request_raised(
        self, err: BaseException, duration_ns: int, deadline: float | None = None, protocol: str = "grpc"
    ) -> None:
        """A request ended with ``err``: counted as a failure by its reason. Errors
        that are neither TaskServeError nor cancellation are bugs, counted as "internal".
        gRPC cancels the handler when the client's deadline passes: that counts as
        "timeout" (the deadline, monotonic, is then past), any other cancel as "cancelled".
        A streaming handler closed before its end (GeneratorExit: the client went away or
        stopped reading while an answer was being written) is a cancel too."""
        if isinstance(err, TaskServeError):
            self.request_failed(err.reason, duration_ns, protocol)
        elif isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            timed_out = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S
            self.request_failed("timeout" if timed_out else "cancelled", duration_ns, protocol)
        elif isinstance(err, Exception):
            self.request_failed("internal", duration_ns, protocol)

    def request_failed(self, reason: str, duration_ns: int, protocol: str = "grpc") -> None:
        s = self._s
        with self._lock:
            s.failure[reason] = s.failure.get(reason, 0) + 1
            self.statistics.fail.add(duration_ns)
            self._fold_door(protocol, reason, duration_ns)

    def stage(self, stage: str, duration_ns: int) -> None:
        self._record(self._apply_stage, (stage, duration_ns))

    def _fold_stage(self, payload: tuple[str, int]) -> None:
        stage, duration_ns = payload
        stages = self._s.stages
        hist = stages.get(stage)
        if hist is None:
            hist = stages[stage] = _Histogram(_LATENCY_BUCKETS)
        hist.observe(duration_ns / 1e9)

    def batch_executed(
        self,
        batch_size: int,
        requests: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
        queue_ns: Iterable[int] = (),
    ) -> None:
        """A batch of ``batch_size`` rows from ``requests`` requests ran; times per
        stage, and optionally each request's time in the queue."""
        self._record(self._apply_batch, (batch_size, requests, input_ns, infer_ns, output_ns, queue_ns))

    def _fold_batch(self, payload: tuple[int, int, int, int, int, Iterable[int]]) -> None:
        batch_size, requests, input_ns, infer_ns, output_ns, queue_ns = payload
        series = self._s
        series.batch_size.observe(batch_size)
        series.compute.observe((input_ns + infer_ns + output_ns) / 1e9)
        series.inference_count += batch_size
        series.execution_count += 1
        s = self.statistics
        s.compute_input.add(input_ns, requests)
        s.compute_infer.add(infer_ns, requests)
        s.compute_output.add(output_ns, requests)
        s.inference_count += batch_size
        s.execution_count += 1
        b = s.batches.get(batch_size)
        if b is None:
            b = s.batches[batch_size] = BatchStatistics()
        b.compute_input.add(input_ns)
        b.compute_infer.add(infer_ns)
        b.compute_output.add(output_ns)
        for wait_ns in queue_ns:
            series.queue.observe(wait_ns / 1e9)
            s.queue.add(wait_ns)

    def first_token(self, seconds: float) -> None:
        """The generation engine emitted a sequence's first token ``seconds`` after it arrived."""
        self._record(self._apply_token, (True, seconds))

    def next_token(self, seconds: float) -> None:
        """The generation engine emitted a further token ``seconds`` after the sequence's previous one."""
        self._record(self._apply_token, (False, seconds))

    def _fold_token(self, payload: tuple[bool, float]) -> None:
        first, seconds = payload
        s = self._s
        (s.first_token if first else s.inter_token).observe(seconds)
        s.generated_tokens += 1

    def generation_state(self, running: int, waiting: int, occupancy: float) -> None:
        """The engine's sequences and the share of its cache positions in use, after an iteration."""
        self._s.generation = (running, waiting, occupancy)  # one store: atomic under the GIL

    def prefix_cache_lookups(self, reused: Sequence[int]) -> None:
        """Sequences admitted with the prefix cache on: each one's prompt positions taken from
        the cache (0: a miss)."""
        self._record(self._fold_prefix, tuple(reused))

    def _fold_prefix(self, reused: tuple[int, ...]) -> None:
        s = self._s
        s.prefix_queries += len(reused)
        s.prefix_hits += sum(1 for n in reused if n > 0)
        s.prefix_reused_tokens += sum(reused)

    def prefix_cache_state(self, cached_slots: int) -> None:
        """Idle slots holding a cached prefix, after planning an iteration."""
        self._s.prefix_cached_slots = cached_slots  # one store: atomic under the GIL

    def rejected(self, reason: str) -> None:
        s = self._s
        with self._lock:
            s.rejected[reason] = s.rejected.get(reason, 0) + 1

    def set_pending(self, count: int) -> None:
        self._s.pending = count  # one store: atomic under the GIL, no lock needed

    def loaded(self, seconds: float) -> None:
        self._s.load_seconds = seconds

    def set_ready(self, ready: bool) -> None:
        self._s.ready = 1 if ready else 0

    def snapshot(self) -> ModelStatistics:
        """A consistent copy for the ModelStatistics RPC, every recorded event included."""
        with self._lock:
            self._s.fold()
            return copy.deepcopy(self.statistics)


class _RequestTracker:
    """``with metrics.track_request(t0):`` — a class, not a generator context
    manager: it runs on every request, and this costs a third as much."""

    __slots__ = ("_deadline", "_metrics", "_protocol", "_started_ns")

    def __init__(
        self, metrics: ModelMetrics, started_ns: int, deadline: float | None = None, protocol: str = "grpc"
    ) -> None:
        self._metrics = metrics
        self._started_ns = started_ns
        self._deadline = deadline
        self._protocol = protocol

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        elapsed = time.perf_counter_ns() - self._started_ns
        if err is None:
            self._metrics.request_succeeded(elapsed, protocol=self._protocol)
        else:
            self._metrics.request_raised(err, elapsed, self._deadline, self._protocol)
