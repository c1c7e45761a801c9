"""The generation engine's asyncio driver: a thin loop around the synchronous core.

``engine_core.EngineCore`` decides (admission, token budget, chunked prefill, slots,
finishing); ``runtimes/generation.py``'s ``DecoderRunner`` computes; this module only
moves between them: plan on the event loop, run the step (the model call and the
sampling, ``DecoderRunner.sample``) on the runner's own thread, update the core, deliver the tokens
to each sequence's stream, record the metrics. The engine knows nothing of tokenizers or
gRPC: the task turns tokens into text, decides on stop strings and cancels the stream
when it has seen enough.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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
    event loop that ran ``start``; the core is touched only there. The runner runs on one
    thread of its own, never concurrently.
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
        self._work = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
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
        seq_id = self.core.add(request)
        delivery = _Delivery(asyncio.Queue(), time.monotonic())
        self._deliveries[seq_id] = delivery
        self._idle.clear()
        self._work.set()
        return GenerationStream(self, seq_id, delivery)

    @property
    def idle(self) -> bool:
        """No sequence unfinished and no step in flight (set by the loop once the last step's
        results are in). Safe to read from any thread."""
        return self._idle.is_set()

    @property
    def running_count(self) -> int:
        return self.core.num_running

    @property
    def waiting_count(self) -> int:
        return self.core.num_waiting

    # -- Lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.name}")

    def inflight_count(self) -> int:
        return self.core.num_unfinished

    async def stop(self, drain: bool = True) -> None:
        if self._stopping:
            return
        self._stopping = True
        if drain and self._task is not None and not self._task.done():
            # Until the work is done, or the loop is (a loop that died would never set idle).
            idle = asyncio.ensure_future(self._idle.wait())
            await asyncio.wait({idle, self._task}, return_when=asyncio.FIRST_COMPLETED)
            idle.cancel()
        self._deliver(self.core.abort_all(ModelNotReady(f"model {self.name!r} was unloaded; retry")))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.close)
        self._thread.shutdown(wait=False)

    # -- the loop ------------------------------------------------------------------------

    def _cancel(self, seq_id: int) -> None:
        self.core.cancel(seq_id)
        self._end(seq_id, None)
        self._work.set()  # the freed slot may admit a waiting sequence

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self.core.schedule(time.monotonic())
            self._deliver(plan.ended)
            self._publish_gauges()
            if plan.prefix_reused and self._metrics is not None:
                self._metrics.prefix_cache_lookups(plan.prefix_reused)
            if not plan.rows:
                released = self.core.take_released_slots()
                if released:  # nothing to run: reset them now (an encoder-decoder's slot holds memory)
                    await loop.run_in_executor(self._thread, _release, self.runner, released)
                    continue
                if self.core.num_unfinished == 0:
                    self._idle.set()
                self._work.clear()
                await self._work.wait()
                continue
            started = time.perf_counter_ns()
            try:
                sampled = await loop.run_in_executor(self._thread, _execute, self.runner, plan)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - every sequence in the step learns why
                failure = err if isinstance(err, TaskServeError) else RuntimeFailure(f"generation step failed: {err}")
                log.exception("model %r: generation step failed", self.name)
                self._deliver(self.core.fail(plan, failure))
                continue
            self.iterations += 1
            if self._metrics is not None:
                # One iteration is one execution of len(rows) rows in the v2 statistics and batch metrics.
                rows = len(plan.rows)
                self._metrics.batch_executed(rows, rows, 0, time.perf_counter_ns() - started, 0)
            self._deliver(self.core.update(plan, sampled))

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

    def _publish_gauges(self) -> None:
        if self._metrics is None:
            return
        limits = self.core.limits
        occupancy = self.core.cached_positions / (limits.max_num_seqs * limits.max_model_len)
        self._metrics.generation_state(self.core.num_running, self.core.num_waiting, occupancy)
        if limits.prefix_caching:
            self._metrics.prefix_cache_state(self.core.num_cached_prefixes)


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
