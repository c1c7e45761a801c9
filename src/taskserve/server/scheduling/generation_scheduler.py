"""The generation engine: continuous batching of token sequences over one runner.

It owns sequences, not requests. Each iteration (one asyncio task plans, one
thread executes):

1. sequences cancelled, past their deadline or finished leave and free their slot;
2. every running sequence that has its whole prompt cached gets one decode row;
3. the remaining token budget (``max_num_batched_tokens``) goes to prompts, in
   arrival order: the unfinished prompts of running sequences first, then waiting
   sequences admitted while a slot is free (``max_num_seqs``), each in chunks of at
   most ``prefill_chunk_size``; a long prompt thus never stalls the running streams;
4. the runner executes all rows (``DecoderRunner.step``: the decode rows as one
   model call), and each sequence whose prompt is complete picks its next token
   with its own ``pick`` callback, on the engine thread, next to the logits.

The engine knows nothing of tokenizers or gRPC: the task turns tokens into text,
decides on stop strings and cancels the stream when it has seen enough. The runner
interface (and the seam for encoder-decoder runners) is ``runtimes/generation.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from taskserve.server.errors import DeadlineExceeded, InvalidInput, ModelNotReady, RuntimeFailure, TaskServeError
from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import GenerationConfig
from taskserve.server.runtimes.generation import DecoderRunner, StepRow
from taskserve.server.scheduling.base import InferRequest, InferResult, Scheduler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceRequest:
    """What the task hands the engine for one generation."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    # Logits row (vocab,) -> next token. Runs on the engine thread; owned by this sequence alone.
    pick: Callable[[np.ndarray], int]
    # Tokens after which the sequence ends (end of sequence); the token itself is delivered.
    stop_token_ids: frozenset[int] = frozenset()
    # Absolute time.monotonic().
    deadline: float | None = None
    # Encoder-decoder runners only: the encoder's states for the source (see StepRow.encoder_states).
    encoder_states: np.ndarray | None = None


# A stream's queue holds tokens, then _END or an exception.
_END = object()


@dataclass(eq=False)
class _Sequence:
    request: SequenceRequest
    queue: asyncio.Queue[object]
    added: float
    slot: int = -1
    # Positions the runner's slot holds.
    computed: int = 0
    generated: int = 0
    last_token: int = -1
    last_emit: float = 0.0
    cancelled: bool = False
    done: bool = False

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.request.prompt)


class GenerationStream:
    """The caller's handle: iterate for tokens; ``cancel`` (or ``aclose``) ends the
    sequence and frees its slot at the next iteration."""

    def __init__(self, engine: GenerationScheduler, sequence: _Sequence) -> None:
        self._engine = engine
        self._sequence = sequence

    def __aiter__(self) -> AsyncIterator[int]:
        return self._tokens()

    async def _tokens(self) -> AsyncIterator[int]:
        queue = self._sequence.queue
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
        if not self._sequence.done:
            self._sequence.cancelled = True
            self._engine._wake()


class GenerationScheduler(Scheduler):
    """Continuous batching over a ``DecoderRunner``. Owns the runner: ``stop`` closes it.

    ``generate``, ``inflight_count`` and ``stop`` are called on the event loop that ran ``start``.
    Also a ``Scheduler`` so the server manages it like any model's, but ``submit`` refuses:
    single requests cannot drive a resident cache.
    """

    def __init__(
        self, name: str, settings: GenerationConfig, runner: DecoderRunner, metrics: ModelMetrics | None = None
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self.max_num_seqs = min(settings.max_num_seqs, runner.max_slots)
        self.max_model_len = min(settings.max_model_len, runner.max_model_len)
        self.chunk_size = settings.prefill_chunk_size or settings.max_num_batched_tokens
        self._metrics = metrics
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: list[_Sequence] = []
        self._free_slots = list(range(self.max_num_seqs))
        self._work = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        # One thread: the runner is never called concurrently.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{name}")
        # Iterations run so far (tests and benchmarks read it).
        self.iterations = 0

    # -- the caller's side -------------------------------------------------------------

    def generate(self, request: SequenceRequest) -> GenerationStream:
        """Queue a sequence; its tokens arrive on the returned stream."""
        if self._stopping:
            raise ModelNotReady(f"model {self.name!r} is stopping; retry on another replica")
        if not request.prompt:
            raise InvalidInput("the prompt has no tokens")
        if request.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        vocab = self.runner.vocab_size
        # Checked here, alone: inside a step one bad row would fail every sequence sharing it.
        if vocab and (min(request.prompt) < 0 or max(request.prompt) >= vocab):
            raise InvalidInput(f"prompt token ids must lie in [0, {vocab}), the vocabulary of model {self.name!r}")
        needed = len(request.prompt) + request.max_new_tokens - 1
        if needed > self.max_model_len:
            raise InvalidInput(
                f"{len(request.prompt)} prompt tokens plus {request.max_new_tokens} new tokens need {needed} "
                f"cache positions; model {self.name!r} holds {self.max_model_len} per sequence "
                "(generation.max_model_len); shorten the prompt or ask for fewer tokens"
            )
        sequence = _Sequence(request, asyncio.Queue(), time.monotonic())
        self._waiting.append(sequence)
        self._wake()
        return GenerationStream(self, sequence)

    def _wake(self) -> None:
        self._work.set()

    @property
    def running_count(self) -> int:
        return len(self._running)

    @property
    def waiting_count(self) -> int:
        return len(self._waiting)

    # -- Scheduler -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"engine-{self.name}")

    async def submit(self, request: InferRequest) -> InferResult:
        raise InvalidInput(
            f"model {self.name!r} runs on the generation engine with a resident KV cache; "
            "use the TextGeneration service"
        )

    def inflight_count(self) -> int:
        return len(self._waiting) + len(self._running)

    async def stop(self, drain: bool = True) -> None:
        if self._stopping:
            return
        self._stopping = True
        if drain:
            while (self._waiting or self._running) and self._task is not None and not self._task.done():
                self._wake()
                await asyncio.sleep(0.01)
        for sequence in [*self._waiting, *self._running]:
            self._end(sequence, ModelNotReady(f"model {self.name!r} was unloaded; retry"))
        self._waiting.clear()
        self._running.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.get_running_loop().run_in_executor(self._thread, self.runner.close)
        self._thread.shutdown(wait=False)

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._retire()
            plan = self._plan()
            self._publish_gauges()
            if not plan:
                self._work.clear()
                await self._work.wait()
                continue
            rows = [row for row, _ in plan]
            picks = [s.request.pick if s.computed + len(r.tokens) >= len(s.request.prompt) else None for r, s in plan]
            started = time.perf_counter_ns()
            try:
                tokens = await loop.run_in_executor(self._thread, _execute, self.runner, rows, picks)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - every sequence in the step learns why
                failure = err if isinstance(err, TaskServeError) else RuntimeFailure(f"generation step failed: {err}")
                log.exception("model %r: generation step failed", self.name)
                for _, sequence in plan:
                    self._end(sequence, failure)
                continue
            self.iterations += 1
            if self._metrics is not None:
                # One iteration is one execution of len(rows) rows in the v2 statistics and batch metrics.
                self._metrics.batch_executed(len(rows), len(rows), 0, time.perf_counter_ns() - started, 0)
            now = time.monotonic()
            for (row, sequence), token in zip(plan, tokens, strict=True):
                sequence.computed = row.start + len(row.tokens)
                if token is not None:
                    self._emit(sequence, token, now)

    def _plan(self) -> list[tuple[StepRow, _Sequence]]:
        budget = self.settings.max_num_batched_tokens
        plan: list[tuple[StepRow, _Sequence]] = []
        for sequence in self._running:
            if sequence.prefilled:
                row = StepRow(sequence.slot, np.asarray([sequence.last_token], np.int64), sequence.computed)
                plan.append((row, sequence))
                budget -= 1
        for sequence in self._running:
            if budget <= 0:
                break
            if not sequence.prefilled:
                budget -= self._add_chunk(plan, sequence, budget)
        while budget > 0 and self._waiting and self._free_slots:
            sequence = self._waiting.popleft()
            sequence.slot = self._free_slots.pop(0)  # lowest first: decode batches stay dense
            self._running.append(sequence)
            budget -= self._add_chunk(plan, sequence, budget)
        return plan

    def _add_chunk(self, plan: list[tuple[StepRow, _Sequence]], sequence: _Sequence, budget: int) -> int:
        prompt = sequence.request.prompt
        size = min(self.chunk_size, budget, len(prompt) - sequence.computed)
        chunk = np.asarray(prompt[sequence.computed : sequence.computed + size], np.int64)
        encoder = sequence.request.encoder_states if sequence.computed == 0 else None
        plan.append((StepRow(sequence.slot, chunk, sequence.computed, encoder), sequence))
        return size

    def _emit(self, sequence: _Sequence, token: int, now: float) -> None:
        if sequence.done:
            return
        request = sequence.request
        sequence.generated += 1
        sequence.last_token = token
        if self._metrics is not None:
            if sequence.generated == 1:
                self._metrics.first_token(now - sequence.added)
            else:
                self._metrics.next_token(now - sequence.last_emit)
        sequence.last_emit = now
        sequence.queue.put_nowait(token)
        if (
            token in request.stop_token_ids
            or sequence.generated >= request.max_new_tokens
            or sequence.computed + 1 > self.max_model_len
        ):
            self._end(sequence, None)

    def _end(self, sequence: _Sequence, error: BaseException | None) -> None:
        """The sequence leaves now: its slot is free for the next iteration."""
        if sequence.done:
            return
        sequence.done = True
        sequence.queue.put_nowait(_END if error is None else error)
        if sequence.slot >= 0:
            self.runner.release(sequence.slot)
            self._free_slots.append(sequence.slot)
            self._free_slots.sort()
            sequence.slot = -1

    def _retire(self) -> None:
        now = time.monotonic()
        for sequence in [*self._running, *self._waiting]:
            deadline = sequence.request.deadline
            if sequence.cancelled:
                self._end(sequence, None)
            elif not sequence.done and deadline is not None and now > deadline:
                self._end(
                    sequence,
                    DeadlineExceeded(f"model {self.name!r}: the deadline passed after {sequence.generated} tokens"),
                )
        if any(s.done for s in self._running):
            self._running = [s for s in self._running if not s.done]
        if any(s.done for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.done)

    def _publish_gauges(self) -> None:
        if self._metrics is None:
            return
        held = sum(s.computed for s in self._running)
        capacity = self.max_num_seqs * self.max_model_len
        self._metrics.generation_state(len(self._running), len(self._waiting), held / capacity)


def _execute(
    runner: DecoderRunner, rows: list[StepRow], picks: list[Callable[[np.ndarray], int] | None]
) -> list[int | None]:
    """On the engine thread: one step, then the tokens of the sequences whose prompt is complete."""
    logits = runner.step(rows)
    return [pick(logits[i]) if pick is not None else None for i, pick in enumerate(picks)]
