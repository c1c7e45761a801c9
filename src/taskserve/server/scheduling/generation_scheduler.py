"""The generation engine's driver: a thin loop around the synchronous core.

``engine_core.EngineCore`` decides (admission, token budget, chunked prefill, slots,
finishing); ``runtimes/generation.py``'s ``DecoderRunner`` computes; this module only
moves between them. The loop runs on a thread of its own: plan, run the step (the model
call and the sampling, ``DecoderRunner.sample``), update the core, plan the next, and hand
each step's tokens to the event loop, which delivers them to the sequences' streams. The
next step so starts as soon as the core has seen the last one's tokens, while the event
loop writes them out; a loop that planned on the event loop would start each step only
after a round trip through it, with the streams' own work (detokenizing, writing) in the
way. The engine knows nothing of tokenizers or gRPC: the task turns tokens into text,
decides on stop strings and cancels the stream when it has seen enough.

The core is shared by the two threads under one lock: the event loop adds and cancels
sequences (so a cancelled stream's slot is free when ``cancel`` returns); the engine
thread plans and updates.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from taskserve.server.errors import ModelNotReady, RuntimeFailure, TaskServeError
from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import GenerationConfig
from taskserve.server.runtimes.generation import DecoderRunner, StepRow
from taskserve.server.runtimes.sampling import TokenSampler
from taskserve.server.scheduling.engine_api import GenerationEngine, SequenceRequest
from taskserve.server.scheduling.engine_core import EngineCore, EngineLimits, SequenceOutput, StepPlan

# Kept importable from here: callers built requests from this module before the split.
__all__ = ["GenerationScheduler", "GenerationStream", "SequenceRequest"]

log = logging.getLogger(__name__)

# A stream's queue holds tokens, then _END or an exception.
_END = object()


@dataclass(eq=False)
class _Delivery:
    """The event-loop side of one sequence: where its tokens go, and its timing."""

    queue: asyncio.Queue[object]
    added: float
    generated: int = 0
    last_emit: float = 0.0
    ended: bool = False


class GenerationStream:
    """The caller's handle: iterate for tokens; ``cancel`` (or leaving the iteration) ends
    the sequence and frees its slot at once."""

    def __init__(self, engine: GenerationScheduler, seq_id: int, delivery: _Delivery) -> None:
        self._engine = engine
        self._seq_id = seq_id
        self._delivery = delivery

    def __aiter__(self) -> AsyncIterator[int]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[int]:
        queue = self._delivery.queue
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, int)
                yield item
        finally:
            self.cancel()

    def cancel(self) -> None:
        if not self._delivery.ended:
            self._engine._cancel(self._seq_id)


class GenerationScheduler(GenerationEngine):
    """Continuous batching over a ``DecoderRunner``. Owns the runner: ``stop`` closes it.

    ``generate``, ``inflight_count``, ``stop`` and the streams' ``cancel`` are called on the
    event loop that ran ``start``; deliveries happen there too. The runner runs on the
    engine's thread only, never concurrently.
    """

    def __init__(
        self, name: str, settings: GenerationConfig, runner: DecoderRunner, metrics: ModelMetrics | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self.core = EngineCore(
            EngineLimits(
                max_num_seqs=min(settings.max_num_seqs, runner.max_slots),
                max_model_len=min(settings.max_model_len, runner.max_model_len),
                max_num_batched_tokens=settings.max_num_batched_tokens,
                prefill_chunk_size=settings.prefill_chunk_size,
                vocab_size=runner.vocab_size,
                name=name,
                prefix_caching=settings.prefix_caching and runner.copies_prefixes,
            )
        )
        self._metrics = metrics
        self._deliveries: dict[int, _Delivery] = {}
        # Guards the core; the engine thread waits on it for work.
        self._lock = threading.Condition()
        self._work = False  # a sequence was added or cancelled since the last plan
        self._exit = False  # the engine thread leaves at its next look
        # Bumped by every generate: an idle report from the thread counts only if none came since.
        self._generation = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failed = False  # the engine thread died: new sequences are refused until a reload
        # Steps run so far (tests and benchmarks read it).
        self.iterations = 0

    # -- GenerationEngine ----------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self.core.limits.max_model_len

    @property
    def max_num_seqs(self) -> int:
        return self.core.limits.max_num_seqs

    def generate(self, request: SequenceRequest) -> GenerationStream:
        if self._stopping:
            raise ModelNotReady(f"model {self.name!r} is stopping; retry on another replica")
        if self._failed:
            raise RuntimeFailure(
                f"model {self.name!r}: the generation engine failed (see the server log); reload the model"
            )
        with self._lock:
            seq_id = self.core.add(request)
            self._generation += 1
            self._work = True
            self._lock.notify()
        delivery = _Delivery(asyncio.Queue(), time.monotonic())
        self._deliveries[seq_id] = delivery
        self._idle.clear()
        return GenerationStream(self, seq_id, delivery)

    @property
    def idle(self) -> bool:
        """No sequence unfinished and no step in flight (set once the last step's results are
        delivered). Safe to read from any thread."""
        return self._idle.is_set()

    @property
    def running_count(self) -> int:
        with self._lock:
            return self.core.num_running

    @property
    def waiting_count(self) -> int:
        with self._lock:
            return self.core.num_waiting

    # -- Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
            self._thread.start()

    def inflight_count(self) -> int:
        with self._lock:
            return self.core.num_unfinished

    async def stop(self, drain: bool = True) -> None:
        if self._stopping:
            return
        self._stopping = True
        thread = self._thread
        if drain and thread is not None and thread.is_alive():
            await self._idle.wait()  # the thread reports idle when it ends too
        with self._lock:
            self._exit = True  # a step in flight is not recorded: its sequences end here
            aborted = self.core.abort_all(ModelNotReady(f"model {self.name!r} was unloaded; retry"))
            self._lock.notify()
        self._deliver(aborted)
        if thread is not None:
            await asyncio.to_thread(thread.join)
            self._thread = None
        await asyncio.to_thread(self.runner.close)

    # -- the engine thread ---------------------------------------------------------------

    def _cancel(self, seq_id: int) -> None:
        with self._lock:
            self.core.cancel(seq_id)
            self._work = True  # the freed slot may admit a waiting sequence
            self._lock.notify()
        self._end(seq_id, None)

    def _post(self, callback: Any, *args: Any) -> None:
        """Run ``callback(*args)`` on the event loop (in the order posted)."""
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed under a stopping server: nobody is listening
            pass

    def _run(self) -> None:
        try:
            self._steps()
        except BaseException:
            log.exception("model %r: the generation engine's thread failed", self.name)
            self._failed = True
            with self._lock:
                aborted = self.core.abort_all(RuntimeFailure(f"model {self.name!r}: the generation engine failed"))
                self._exit = True
            self._post(self._end_all, aborted)

    def _steps(self) -> None:
        while True:
            with self._lock:
                if self._exit:
                    return
                self._work = False
                plan = self.core.schedule(time.monotonic())
                released = () if plan.rows else tuple(self.core.take_released_slots())
                gauges = self._gauges()
                generation, unfinished = self._generation, self.core.num_unfinished
            if plan.ended:
                self._post(self._deliver, plan.ended)
            self._publish(gauges, plan.prefix_reused)
            if released:  # nothing to run: reset them now (an encoder-decoder's slot holds memory)
                _release(self.runner, released)
                continue
            if not plan.rows:
                if unfinished == 0:
                    self._post(self._report_idle, generation)
                with self._lock:
                    while not (self._work or self._exit):
                        self._lock.wait()
                continue
            started = time.perf_counter_ns()
            try:
                sampled = _execute(self.runner, plan)
            except Exception as err:  # noqa: BLE001 - every sequence in the step learns why
                failure = err if isinstance(err, TaskServeError) else RuntimeFailure(f"generation step failed: {err}")
                log.exception("model %r: generation step failed", self.name)
                with self._lock:
                    outputs = [] if self._exit else self.core.fail(plan, failure)
                self._post(self._deliver, outputs)
                continue
            with self._lock:
                if self._exit:
                    return
                outputs = self.core.update(plan, sampled)
            self._post(self._deliver, outputs)
            self.iterations += 1
            if self._metrics is not None:
                # One iteration is one execution of len(rows) rows in the v2 statistics and batch metrics.
                rows = len(plan.rows)
                self._metrics.batch_executed(rows, rows, 0, time.perf_counter_ns() - started, 0)

    def _gauges(self) -> tuple[int, int, float, int]:
        """What the gauges show, read under the lock: running, waiting, cache occupancy, cached prefixes."""
        core, limits = self.core, self.core.limits
        occupancy = core.cached_positions / (limits.max_num_seqs * limits.max_model_len)
        return core.num_running, core.num_waiting, occupancy, core.num_cached_prefixes

    def _publish(self, gauges: tuple[int, int, float, int], prefix_reused: Sequence[int]) -> None:
        if self._metrics is None:
            return
        running, waiting, occupancy, cached = gauges
        self._metrics.generation_state(running, waiting, occupancy)
        if self.core.limits.prefix_caching:
            self._metrics.prefix_cache_state(cached)
        if prefix_reused:
            self._metrics.prefix_cache_lookups(prefix_reused)

    # -- on the event loop ---------------------------------------------------------------

    def _report_idle(self, generation: int) -> None:
        """The thread found nothing to do: idle, unless a sequence was added since it looked."""
        if generation == self._generation:
            self._idle.set()

    def _end_all(self, aborted: Sequence[SequenceOutput]) -> None:
        """On the event loop, after a failure of the thread: idle before any stream learns why, so
        a caller that saw its stream end never finds the engine busy."""
        self._idle.set()
        self._deliver(aborted)

    def _deliver(self, outputs: Sequence[SequenceOutput]) -> None:
        now = time.monotonic()
        for output in outputs:
            delivery = self._deliveries.get(output.seq_id)
            if delivery is None or delivery.ended:
                continue
            if output.token is not None:
                delivery.generated += 1
                if self._metrics is not None:
                    if delivery.generated == 1:
                        self._metrics.first_token(now - delivery.added)
                    else:
                        self._metrics.next_token(now - delivery.last_emit)
                delivery.last_emit = now
                delivery.queue.put_nowait(output.token)
            if output.finished:
                self._end(output.seq_id, output.error)

    def _end(self, seq_id: int, error: BaseException | None) -> None:
        delivery = self._deliveries.pop(seq_id, None)
        if delivery is not None and not delivery.ended:
            delivery.ended = True
            delivery.queue.put_nowait(_END if error is None else error)


def _release(runner: DecoderRunner, slots: Sequence[int]) -> None:
    for slot in slots:
        runner.release(slot)


def _execute(runner: DecoderRunner, plan: StepPlan) -> list[int | None]:
    """On the runner's thread: reset the slots whose sequences left, make the prefix copies (in
    order, before any row writes), run the step; the runner samples the next token of every
    row that completes its prompt or decodes."""
    _release(runner, plan.released_slots)
    for copy in plan.copies:
        runner.copy_prefix(copy.src, copy.dst, copy.positions)
    rows: list[StepRow] = plan.step_rows
    samplers: list[TokenSampler | None] = [r.sampler if r.samples else None for r in plan.rows]
    return runner.sample(rows, samplers)
