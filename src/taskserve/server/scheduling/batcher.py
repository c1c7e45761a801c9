"""The dynamic batcher: a single-owner actor in front of N runtime instances.

One asyncio task (``_batching_loop``) owns the queue and forms batches; callers
only push a request and await its future. Each instance runs its batches on
its own thread. A batch is formed when an instance is free:

* nothing executing anywhere: the queued requests go at once (an idle server
  adds no delay);
* other batches executing: a partial batch waits up to ``max_queue_delay``
  (from its oldest request) for more, unless it is already complete;
* every instance busy: a complete batch is handed to a busy instance's thread
  as the next one (prefetch), so that instance starts it without a round trip
  through the event loop;
* tiny models: a batch whose measured cost is below ``inline_compute_us`` runs
  on the event loop itself when nothing else executes, because the hand-off to
  a thread and back costs more than the model.

Requests cancelled or past their deadline are dropped when a batch is formed,
and again on the instance thread just before compute: they are never computed.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import time
from collections.abc import Callable, Hashable, Sequence

from taskserve.server.errors import (
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    Overloaded,
    SchedulingFailure,
    TaskServeError,
)
from taskserve.server.metrics import ModelMetrics
from taskserve.server.runtimes.base import Runtime
from taskserve.server.scheduling.base import InferRequest, InferResult, Scheduler
from taskserve.server.scheduling.execution import Batch, Instance, Outcome, execute_one, timed_execute_batch
from taskserve.server.scheduling.layout import TensorLayout
from taskserve.server.scheduling.policy import BatchPolicy
from taskserve.server.scheduling.request_queue import PendingRequest, RequestQueue

log = logging.getLogger(__name__)


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class DynamicBatcher(Scheduler):
    """Batches one model version's requests over its runtime instances.

    Owns the runtimes it is given: ``stop`` closes them. ``submit``,
    ``inflight_count`` and ``stop`` must be called on the event loop that ran ``start``.
    """

    def __init__(
        self,
        layout: TensorLayout,
        policy: BatchPolicy,
        runtimes: Sequence[Runtime],
        metrics: ModelMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not runtimes:
            raise ValueError(f"model {layout.model!r}: a batcher needs at least one runtime instance")
        self.layout = layout
        self.policy = policy
        self._metrics = metrics
        self._clock = clock
        self._instances = [Instance(i, r, layout.model, policy.inline_compute_s) for i, r in enumerate(runtimes)]
        self._queue = RequestQueue(policy.priority_levels)
        self._seq = itertools.count()
        self._executing = 0  # requests in batches handed to instances
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._state = _State.NEW
        self._loop_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._batch_tasks: set[asyncio.Task[None]] = set()

    @property
    def model(self) -> str:
        return self.layout.model

    # -- Scheduler interface ---------------------------------------------------------------

    async def start(self) -> None:
        if self._state is not _State.NEW:
            return
        self._state = _State.RUNNING
        self._loop_task = asyncio.get_running_loop().create_task(
            self._batching_loop(), name=f"batcher-{self.model}"
        )

    async def submit(self, request: InferRequest) -> InferResult:
        if self._state is not _State.RUNNING:
            raise self._refuse(ModelNotReady(self._not_ready_message()))
        now = self._clock()
        rows, key, priority, deadline = self._check(request, now)
        if not self._executing and not len(self._queue):
            # Nothing executes, so every instance is idle: the first computes now, on this
            # turn of the loop, if the request is cheap enough (the fast path for tiny
            # models; written out here, every request asks). Nothing queues, so the
            # pending gauge never sees it.
            instance = self._instances[0]
            if rows <= instance.inline_rows:
                return execute_one(instance, request.inputs, request.output_names, rows, self.layout, self._metrics)
        entry = PendingRequest(
            request=request,
            future=asyncio.get_running_loop().create_future(),
            key=key,
            rows=rows,
            priority=priority,
            deadline=deadline,
            seq=next(self._seq),
            enqueued_at=now,
            enqueued_ns=time.perf_counter_ns(),
        )
        self._queue.push(entry)
        self._update_pending()
        self._wake.set()
        # Still queued at its deadline: fail then rather than when an instance frees.
        timer = (
            asyncio.get_running_loop().call_later(max(0.0, deadline - now), self._expire, entry)
            if deadline is not None
            else None
        )
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The caller went away: the request leaves the queue, or is skipped
            # by the instance thread if it is already in a batch.
            entry.cancelled = True
            entry.future.cancel()
            if self._queue.remove(entry):
                self._update_pending()
                self._count_rejected("cancelled")
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, entry: PendingRequest) -> None:
        if self._queue.remove(entry):
            self._update_pending()
            self._resolve(entry, self._refuse(self._deadline_error()))

    def inflight_count(self) -> int:
        return len(self._queue) + self._executing

    async def stop(self, drain: bool = True) -> None:
        if self._stop_task is None:
            started = self._state is not _State.NEW
            self._state = _State.STOPPING  # refuse new requests from now on
            self._stop_task = asyncio.get_running_loop().create_task(self._shutdown(drain, started))
        await asyncio.shield(self._stop_task)

    # -- admission -------------------------------------------------------------------------

    def _check(self, request: InferRequest, now: float) -> tuple[int, Hashable, int, float | None]:
        """Check a request: its rows, batching key, priority and deadline, or raise why it is refused."""
        policy = self.policy
        try:
            signature = self.layout.describe(request.inputs, request.output_names, policy.max_rows)
        except InvalidInput as err:
            raise self._refuse(err) from None
        priority = request.priority or policy.default_priority  # 0 and None both mean "default"
        if not 1 <= priority <= policy.priority_levels:
            raise self._refuse(
                InvalidInput(
                    f"priority {priority} is out of range for model {self.model!r}: "
                    f"use 1 (highest) to {policy.priority_levels}"
                )
            )
        deadline = request.deadline
        if deadline is None and policy.default_timeout_s > 0:
            deadline = now + policy.default_timeout_s
        if deadline is not None and now >= deadline:
            raise self._refuse(self._deadline_error())
        if policy.max_queue_size and len(self._queue) >= policy.max_queue_size:
            raise self._refuse(
                Overloaded(
                    f"model {self.model!r} has {len(self._queue)} requests queued, its limit "
                    f"(dynamic_batching.max_queue_size = {policy.max_queue_size}); retry later"
                )
            )
        return signature.rows, signature.key, priority, deadline

    def _deadline_error(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"request to model {self.model!r} passed its deadline before compute started")

    def _not_ready_message(self) -> str:
        if self._state is _State.NEW:
            return f"model {self.model!r} is not started yet"
        return f"model {self.model!r} is shutting down and accepts no new requests"

    def _refuse(self, err: TaskServeError) -> TaskServeError:
        self._count_rejected(err.reason)
        return err

    def _count_rejected(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.rejected(reason)

    def _update_pending(self) -> None:
        if self._metrics is not None:
            self._metrics.set_pending(self.inflight_count())

    # -- the actor loop --------------------------------------------------------------------

    async def _batching_loop(self) -> None:
        while True:
            try:
                timeout = self._dispatch()
            except Exception:  # a bug here must not hang every caller
                log.exception("batcher of model %r failed while forming a batch", self.model)
                self._fail_queued(SchedulingFailure(f"model {self.model!r} hit an internal scheduling error"))
                timeout = None
            if self._state is _State.STOPPING and not len(self._queue) and not self._executing:
                # Return rather than be cancelled: a CancelledError's traceback holds this
                # frame, and so the batcher and its runtimes, in a cycle only a full
                # garbage collection frees.
                self._drained.set()
                return
            if timeout is None:
                await self._wake.wait()  # the common case: no timer to arm
            else:
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()

    def _free_instance(self) -> Instance | None:
        """An idle instance, else one whose prefetch slot is free."""
        waiting = None
        for instance in self._instances:
            if instance.assigned == 0:
                return instance
            if waiting is None and instance.assigned == 1:
                waiting = instance
        return waiting

    def _dispatch(self) -> float | None:
        """Hand off every batch that should start now. Returns the seconds until a
        waiting partial batch's delay ends (None: wait for the next event)."""
        policy = self.policy
        while True:
            instance = self._free_instance()
            if instance is None:
                return None
            head = self._queue.head()
            if head is None:
                return None
            now = self._clock()
            candidate = self._queue.peek(head.key, policy.max_rows, now)
            for entry in candidate.expired:
                self._resolve(entry, self._refuse(self._deadline_error()))
            if candidate.expired:
                self._update_pending()
            if not candidate.entries:
                continue
            hurry = self._state is not _State.RUNNING  # draining: no reason to wait
            if not hurry and not policy.is_complete(candidate.rows, candidate.blocked):
                if instance.assigned > 0:
                    return None  # prefetch only batches that cannot grow any more
                if self._executing and policy.max_queue_delay_s > 0:
                    oldest = min(e.enqueued_at for e in candidate.entries)
                    remaining = oldest + policy.max_queue_delay_s - now
                    if remaining > 0:
                        return remaining
            entries = candidate.entries[: policy.cut([e.rows for e in candidate.entries])]
            self._queue.take(entries)
            self._hand_off(instance, Batch(tuple(entries)))

    def _runs_inline(self, instance: Instance, rows: int) -> bool:
        return not instance.assigned and not self._executing and rows <= instance.inline_rows

    def _hand_off(self, instance: Instance, batch: Batch) -> None:
        if self._runs_inline(instance, batch.rows):
            outcomes, seconds = timed_execute_batch(
                instance.runtime, batch, self.layout, self._clock, self._metrics
            )
            instance.record(seconds, batch.rows)
            self._update_pending()
            for entry, outcome in zip(batch.entries, outcomes, strict=True):
                if outcome is not None:
                    self._resolve(entry, outcome)
            return
        # Alone: nothing else computes and nothing waits, so this batch may take every core.
        alone = not self._executing and not len(self._queue)
        instance.assigned += 1
        self._executing += len(batch.entries)
        task = asyncio.get_running_loop().create_task(self._run_batch(instance, batch, alone))
        self._batch_tasks.add(task)
        task.add_done_callback(self._batch_tasks.discard)

    async def _run_batch(self, instance: Instance, batch: Batch, alone: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
            outcomes: list[Outcome]
            outcomes, seconds = await loop.run_in_executor(
                instance.executor,
                timed_execute_batch,
                instance.runtime,
                batch,
                self.layout,
                self._clock,
                self._metrics,
                alone,
            )
            instance.record(seconds, batch.rows)
        except Exception as err:  # e.g. the executor was shut down
            log.exception("model %r: could not execute a batch", self.model)
            failure = SchedulingFailure(f"model {self.model!r} could not execute the request: {err}")
            outcomes = [failure] * len(batch.entries)
        finally:
            instance.assigned -= 1
            self._executing -= len(batch.entries)
            self._update_pending()
            self._wake.set()
        for entry, outcome in zip(batch.entries, outcomes, strict=False):
            if outcome is not None:
                self._resolve(entry, outcome)

    @staticmethod
    def _resolve(entry: PendingRequest, outcome: InferResult | TaskServeError) -> None:
        if entry.future.done():
            return
        if isinstance(outcome, InferResult):
            entry.future.set_result(outcome)
        else:
            entry.future.set_exception(outcome)

    def _fail_queued(self, err: TaskServeError) -> None:
        for entry in self._queue.drain():
            self._count_rejected(err.reason)
            self._resolve(entry, err)
        self._update_pending()

    # -- shutdown --------------------------------------------------------------------------

    async def _shutdown(self, drain: bool, started: bool) -> None:
        if not drain:
            self._fail_queued(ModelNotReady(f"model {self.model!r} stopped before the request was computed"))
        if started:
            self._wake.set()
            await self._drained.wait()
            if self._batch_tasks:
                await asyncio.gather(*self._batch_tasks, return_exceptions=True)
            if self._loop_task is not None:
                await asyncio.gather(self._loop_task, return_exceptions=True)
                self._loop_task = None
        loop = asyncio.get_running_loop()
        for instance in self._instances:
            try:
                # Close on the instance's own thread: runtimes are not thread-safe.
                await loop.run_in_executor(instance.executor, instance.runtime.close)
            except Exception:  # closing must go on for the other instances
                log.exception("model %r: closing instance %d failed", self.model, instance.index)
            instance.executor.shutdown(wait=True)
        self._state = _State.STOPPED
        self._update_pending()
