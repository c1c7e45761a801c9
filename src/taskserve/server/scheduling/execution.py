"""Executing one batch on one runtime instance, on that instance's thread.

Requests cancelled or past their deadline by the time the thread picks the
batch up are left out (never computed). Never raises: failures become
per-request errors so the batcher's loop keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from taskserve.server.errors import DeadlineExceeded, InputRejected, InvalidInput, RuntimeFailure, TaskServeError
from taskserve.server.metrics import ModelMetrics
from taskserve.server.runtimes.base import Runtime
from taskserve.server.scheduling.base import InferResult
from taskserve.server.scheduling.collate import collate, own_outputs, split
from taskserve.server.scheduling.layout import TensorLayout
from taskserve.server.scheduling.request_queue import PendingRequest

log = logging.getLogger(__name__)

Outcome = InferResult | TaskServeError | None  # None: the caller cancelled; nothing to deliver


@dataclass(frozen=True)
class Batch:
    entries: tuple[PendingRequest, ...]

    @property
    def rows(self) -> int:
        return sum(e.rows for e in self.entries)


class Instance:
    """One runtime and the single thread it runs on (a Runtime is not thread-safe).

    ``assigned`` counts batches handed to this instance and not yet finished:
    one executing plus at most one waiting in the executor (the prefetch slot).
    Touched only on the event loop.
    """

    def __init__(self, index: int, runtime: Runtime, model: str, inline_compute_s: float = 0.0) -> None:
        self.index = index
        self.runtime = runtime
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"taskserve-{model}-{index}")
        self.assigned = 0
        # Smoothed seconds of execute_batch per row; None until a batch ran.
        self.seconds_per_row: float | None = None
        # Batches expected to compute within this long may run on the event loop; the
        # most rows that fit is kept ready, since the batcher asks for every request.
        self._inline_compute_s = inline_compute_s
        self.inline_rows = 0

    def record(self, seconds: float, rows: int) -> None:
        """Fold one batch's execution time into the per-row estimate."""
        if rows <= 0:
            return
        per_row = seconds / rows
        previous = self.seconds_per_row
        # Not clipped: a model that turns out slower than its first batches must leave the
        # inline path (which blocks the event loop) at once; a spurious slow sample only
        # sends a few requests through the instance thread.
        estimate = self.seconds_per_row = per_row if previous is None else 0.8 * previous + 0.2 * per_row
        if self._inline_compute_s > 0:
            self.inline_rows = int(self._inline_compute_s / estimate) if estimate > 0 else 1 << 30


def _expired(model: str, entry: PendingRequest) -> DeadlineExceeded:
    return DeadlineExceeded(
        f"request to model {model!r} passed its deadline while queued; it was not computed"
    )


def _as_failure(err: Exception, layout: TensorLayout, rows: int, others_computed: bool = False) -> TaskServeError:
    """What a request that failed on its own gets.

    The rule (docs/robustness.md, "Fault isolation"): a failure is the request's
    fault (INVALID_ARGUMENT) when the runtime says its values are invalid
    (InputRejected), or when it failed alone while other requests of the same batch
    computed on the same instance, so the model is healthy and only these inputs
    break it. Otherwise it is the server's (INTERNAL RuntimeFailure, logged)."""
    if isinstance(err, InvalidInput):
        return err
    if others_computed:
        detail = err.message if isinstance(err, TaskServeError) else f"{type(err).__name__}: {err}"
        return InputRejected(
            f"model {layout.model!r} could not compute this request (other requests in its batch computed): "
            f"{detail}; check its values are in the model's domain (e.g. token ids below the vocabulary size, "
            "sequences within the model's positions, lengths that match between inputs)"
        )
    if isinstance(err, TaskServeError):
        log.warning("model %r failed on %d rows: %s", layout.model, rows, err.message)
        return err
    log.error("model %r failed on a batch of %d rows", layout.model, rows, exc_info=err)
    return RuntimeFailure(f"model {layout.model!r} failed on a batch of {rows} rows: {type(err).__name__}: {err}")


def timed_execute_batch(
    runtime: Runtime,
    batch: Batch,
    layout: TensorLayout,
    clock: Callable[[], float],
    metrics: ModelMetrics | None,
    alone: bool = False,
) -> tuple[list[Outcome], float]:
    """``execute_batch`` and the seconds it took."""
    start = time.perf_counter()
    outcomes = execute_batch(runtime, batch, layout, clock, metrics, alone)
    return outcomes, time.perf_counter() - start


def execute_batch(
    runtime: Runtime,
    batch: Batch,
    layout: TensorLayout,
    clock: Callable[[], float],
    metrics: ModelMetrics | None,
    alone: bool = False,
) -> list[Outcome]:
    """Run ``batch``; one outcome per entry, in order. ``alone``: nothing else of the
    model computes or waits, so the runtime may use every core (``Runtime.infer_alone``)."""
    now = clock()
    outcomes: list[Outcome] = [None] * len(batch.entries)
    live: list[int] = []
    for i, entry in enumerate(batch.entries):
        if entry.cancelled:
            continue
        if entry.expired(now):
            outcomes[i] = _expired(layout.model, entry)
            if metrics is not None:
                metrics.rejected("timeout")
            continue
        live.append(i)
    if not live:
        return outcomes

    failed: dict[int, Exception] = {}
    computed = _compute_isolating(runtime, batch, live, layout, metrics, outcomes, failed, alone)
    if failed:
        for i, err in failed.items():
            outcomes[i] = _as_failure(err, layout, batch.entries[i].rows, others_computed=computed)
    return outcomes


def _compute_isolating(
    runtime: Runtime,
    batch: Batch,
    indices: list[int],
    layout: TensorLayout,
    metrics: ModelMetrics | None,
    outcomes: list[Outcome],
    failed: dict[int, Exception],
    alone: bool = False,
) -> bool:
    """Compute the entries at ``indices``; when the batch fails, bisect it and compute
    each half on its own, down to single requests, so one request whose inputs break
    the model fails alone and the others get their results. A failing batch of n
    requests with one offender costs about 2 log2(n) extra executions, on this
    instance's thread. Returns whether any entry computed; failures land in ``failed``."""
    try:
        _compute(runtime, batch, indices, layout, metrics, outcomes, alone)
        return True
    except Exception as err:  # noqa: BLE001 - every failure is isolated, then classified
        if len(indices) == 1:
            failed[indices[0]] = err
            return False
        log.info(
            "model %r: a batch of %d requests failed (%s); retrying it in halves to isolate the cause",
            layout.model, len(indices), err,
        )  # fmt: skip
    half = len(indices) // 2
    left = _compute_isolating(runtime, batch, indices[:half], layout, metrics, outcomes, failed, alone)
    right = _compute_isolating(runtime, batch, indices[half:], layout, metrics, outcomes, failed, alone)
    return left or right


def _compute(
    runtime: Runtime,
    batch: Batch,
    live: list[int],
    layout: TensorLayout,
    metrics: ModelMetrics | None,
    outcomes: list[Outcome],
    alone: bool = False,
) -> None:
    """Collate, infer and split the entries at ``live``; their results go into ``outcomes``. Raises on failure."""
    entries = [batch.entries[i] for i in live]
    start_ns = time.perf_counter_ns()
    rows = sum(e.rows for e in entries)
    collated = collate([e.request.inputs for e in entries], layout)
    wanted = [e.request.output_names for e in entries]
    union = None if any(w is None for w in wanted) else sorted({n for w in wanted if w for n in w})
    input_done_ns = time.perf_counter_ns()
    outputs = (runtime.infer_alone if alone else runtime.infer)(collated.inputs, union)
    infer_done_ns = time.perf_counter_ns()
    per_request = split(outputs, collated, layout, wanted)
    end_ns = time.perf_counter_ns()

    compute_ns = end_ns - start_ns
    queue_ns = [start_ns - entry.enqueued_ns for entry in entries]
    if metrics is not None:
        metrics.batch_executed(
            rows,
            len(entries),
            input_done_ns - start_ns,
            infer_done_ns - input_done_ns,
            end_ns - infer_done_ns,
            queue_ns,
        )
    for i, outputs_i, waited_ns in zip(live, per_request, queue_ns, strict=False):
        outcomes[i] = InferResult(outputs=outputs_i, queue_ns=waited_ns, compute_ns=compute_ns, batch_size=rows)


def execute_one(
    instance: Instance,
    inputs: Mapping[str, np.ndarray],
    wanted: tuple[str, ...] | None,
    rows: int,
    layout: TensorLayout,
    metrics: ModelMetrics | None,
) -> InferResult:
    """Run one request as its own batch, now, on the calling thread: the inline
    path of an idle batcher. No collate or split: a lone request is already the
    batch, and its time goes into the instance's estimate. Raises TaskServeError
    (RuntimeFailure for anything unexpected)."""
    start_ns = time.perf_counter_ns()
    try:
        feed = inputs if isinstance(inputs, dict) else dict(inputs)
        outputs = instance.runtime.infer(feed, list(wanted) if wanted is not None else None)
        own = own_outputs(outputs, layout, rows, wanted)
    except Exception as err:
        raise _as_failure(err, layout, rows) from None
    # One clock pair: picking a lone request's outputs is a dict lookup, so it counts as
    # inference (compute_output 0) rather than costing two more clock reads per request.
    compute_ns = time.perf_counter_ns() - start_ns
    if metrics is not None:
        metrics.batch_executed(rows, 1, 0, compute_ns, 0, (0,))
    instance.record(compute_ns / 1e9, rows)
    return InferResult(outputs=own, queue_ns=0, compute_ns=compute_ns, batch_size=rows)
