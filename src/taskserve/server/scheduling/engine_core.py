"""The generation engine's synchronous core: which rows run next, and what their tokens mean.

Shaped as vLLM v1's scheduler: no threads, no clock, no asyncio. The driver
(``generation_scheduler.py``) calls, in a loop::

    plan = core.schedule(now)                 # who leaves, who joins, which rows run
    sampled = runner.step(plan) ...           # on the runner's thread
    outputs = core.update(plan, sampled)      # tokens to deliver, sequences that finished

``schedule`` builds one step:

1. sequences cancelled or past their deadline leave and free their slot;
2. every running sequence whose prompt is cached gets one decode row (running streams
   keep their pace whatever arrives);
3. the rest of the token budget (``max_num_batched_tokens``) goes to prompts in arrival
   order: the unfinished prompts of running sequences first, then waiting sequences
   admitted while a slot is free (``max_num_seqs``), each in chunks of at most
   ``prefill_chunk_size`` tokens, so one step carries the chunks of several prompts and
   a long prompt never holds back the streams or the prompts behind it for long.

Each sequence owns one cache slot (``kv_slots.SlotAllocator``) from admission until it
leaves; ``cancel`` frees it at once. The core is owned by one thread (the event loop);
the plan it hands out is immutable and safe to read on the runner's thread.

Prefix cache (``EngineLimits.prefix_caching``; docs/generation.md, "Prefix cache"): the
positions every slot has computed are indexed by their tokens (``prefix_cache.PrefixIndex``).
A sequence that leaves with at least one whole block computed keeps its slot as a cached
prefix: idle, evictable, least recently used first. A waiting sequence whose prompt starts
with tokens some slot holds is admitted with those positions already in place: it takes
an idle cached slot over (no copy) or gets them copied into its own slot
(``StepPlan.copies``, run by the runner before the step's rows), and prefills only the
rest; its last prompt token is always computed (the sampler needs its logits). A slot for
a new sequence is a free one if any, else the least recently used cached prefix; a
running sequence's slot is never taken.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from taskserve.server.errors import DeadlineExceeded, InvalidInput, TaskServeError
from taskserve.server.runtimes.generation import StepRow
from taskserve.server.runtimes.sampling import TokenSampler
from taskserve.server.scheduling.engine_api import SequenceRequest
from taskserve.server.scheduling.kv_slots import SlotAllocator
from taskserve.server.scheduling.prefix_cache import BLOCK_TOKENS, PrefixHit, PrefixIndex


@dataclass(frozen=True, slots=True)
class ScheduledRow:
    """One sequence's row in a step; ``samples``: the row completes the prompt (or decodes),
    so the runner samples the sequence's next token (``sampler``) from its logits."""

    seq_id: int
    row: StepRow
    samples: bool
    sampler: TokenSampler


@dataclass(frozen=True, slots=True)
class SequenceOutput:
    """What happened to one sequence: a token to deliver, and/or its end (``error`` says why
    it failed; None with ``finished`` is a normal end: stop token, length, cancel)."""

    seq_id: int
    token: int | None
    finished: bool
    error: TaskServeError | None = None


@dataclass(frozen=True, slots=True)
class PrefixCopy:
    """Before the step's rows: slot ``dst`` takes positions ``[0, positions)`` of slot ``src``
    (``src == dst``: a slot taken over keeps its first ``positions`` positions, no copy)."""

    src: int
    dst: int
    positions: int


@dataclass(frozen=True)
class StepPlan:
    """One step: the rows to run, the slots to reset before it (their sequences left), the
    prefix copies to make after the resets and before the rows (in order: a later copy may
    read what an earlier one wrote), and the sequences that left while it was planned
    (cancelled, past their deadline). ``prefix_reused``: for each sequence admitted with the
    prefix cache on, the prompt positions it did not compute (0: a miss)."""

    rows: tuple[ScheduledRow, ...] = ()
    released_slots: tuple[int, ...] = ()
    ended: tuple[SequenceOutput, ...] = ()
    copies: tuple[PrefixCopy, ...] = ()
    prefix_reused: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(r.row.tokens) for r in self.rows)

    @property
    def step_rows(self) -> list[StepRow]:
        return [r.row for r in self.rows]


@dataclass(eq=False)
class _Sequence:
    seq_id: int
    request: SequenceRequest
    slot: int = -1
    # Positions the runner's slot holds.
    computed: int = 0
    generated: int = 0
    last_token: int = -1
    done: bool = False
    # Generated tokens, kept only while the prefix cache indexes this sequence's slot.
    output: list[int] = field(default_factory=list)

    @property
    def cacheable(self) -> bool:
        """Its cache depends on its tokens alone (an encoder-decoder's depends on the source too)."""
        return self.request.encoder_states is None

    def tokens(self) -> tuple[int, ...]:
        """The tokens at the slot's positions: the prompt, then the generated ones fed back."""
        return self.request.prompt + tuple(self.output)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.request.prompt)


@dataclass
class EngineLimits:
    max_num_seqs: int
    max_model_len: int
    max_num_batched_tokens: int
    # 0: up to max_num_batched_tokens.
    prefill_chunk_size: int = 0
    # 0: unknown (prompts are not checked against it).
    vocab_size: int = 0
    name: str = "model"
    # Keep computed prefixes in idle slots and reuse them (module doc).
    prefix_caching: bool = False
    prefix_block: int = BLOCK_TOKENS


@dataclass
class EngineCore:
    limits: EngineLimits
    _waiting: collections.deque[_Sequence] = field(default_factory=collections.deque)
    _running: list[_Sequence] = field(default_factory=list)
    _by_id: dict[int, _Sequence] = field(default_factory=dict)
    _released: list[int] = field(default_factory=list)
    _ended: list[SequenceOutput] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.slots = SlotAllocator(self.limits.max_num_seqs)
        self.chunk_size = self.limits.prefill_chunk_size or self.limits.max_num_batched_tokens
        self.prefixes = PrefixIndex(self.limits.prefix_block)
        # Idle slots holding a cached prefix, least recently used first.
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()

    # -- the caller's side ---------------------------------------------------------------

    def add(self, request: SequenceRequest) -> int:
        """Queue a sequence; its id names it in plans and outputs. InvalidInput for one
        that could never run (checked here, alone: inside a step its row would fail every
        sequence sharing it)."""
        limits = self.limits
        if not request.prompt:
            raise InvalidInput("the prompt has no tokens")
        if request.max_new_tokens < 1:
            raise InvalidInput("max_new_tokens must be at least 1")
        vocab = limits.vocab_size
        if vocab and (min(request.prompt) < 0 or max(request.prompt) >= vocab):
            raise InvalidInput(f"prompt token ids must lie in [0, {vocab}), the vocabulary of model {limits.name!r}")
        needed = len(request.prompt) + request.max_new_tokens - 1
        if needed > limits.max_model_len:
            raise InvalidInput(
                f"{len(request.prompt)} prompt tokens plus {request.max_new_tokens} new tokens need {needed} "
                f"cache positions; model {limits.name!r} holds {limits.max_model_len} per sequence "
                "(generation.max_model_len); shorten the prompt or ask for fewer tokens"
            )
        sequence = _Sequence(next(self._ids), request)
        self._waiting.append(sequence)
        self._by_id[sequence.seq_id] = sequence
        return sequence.seq_id

    def cancel(self, seq_id: int) -> bool:
        """End the sequence now: its slot is free for the next ``schedule`` (a step in flight
        may still compute its row; ``update`` drops that token). False when it had ended."""
        sequence = self._by_id.get(seq_id)
        if sequence is None or sequence.done:
            return False
        self._finish(sequence, None, report=False)
        self._drop_done()
        return True

    def abort_all(self, error: TaskServeError) -> list[SequenceOutput]:
        """End every sequence with ``error`` (the engine is stopping)."""
        outputs = []
        for sequence in [*self._running, *self._waiting]:
            outputs.append(SequenceOutput(sequence.seq_id, None, True, error))
            self._finish(sequence, error, report=False, keep_prefix=False)
        self._drop_done()
        return outputs

    # -- counts --------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    @property
    def cached_positions(self) -> int:
        return sum(s.computed for s in self._running)

    @property
    def num_cached_prefixes(self) -> int:
        """Idle slots holding a cached prefix."""
        return len(self._cached)

    def take_released_slots(self) -> list[int]:
        """Slots given back since the last plan (for a runner reset outside a step)."""
        released, self._released = self._released, []
        return released

    # -- one step ------------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        """Retire cancelled and expired sequences, then plan the next step (see the module doc)."""
        self._expire(now)
        budget = self.limits.max_num_batched_tokens
        rows: list[ScheduledRow] = []
        for sequence in self._running:
            if sequence.prefilled:
                row = StepRow(sequence.slot, np.asarray([sequence.last_token], np.int64), sequence.computed)
                rows.append(ScheduledRow(sequence.seq_id, row, True, sequence.request.sampler))
                budget -= 1
        for sequence in self._running:
            if budget <= 0:
                break
            if not sequence.prefilled:
                budget -= self._add_chunk(rows, sequence, budget)
        copies: list[PrefixCopy] = []
        reused: list[int] = []
        waiting, deferred = self._waiting, []
        while budget > 0 and waiting:
            hit = self._best_prefix(waiting[0])
            if self._wait_for_prefix(waiting[0], hit):
                deferred.append(waiting.popleft())
                continue
            if not self._admit(waiting[0], hit, copies, reused):
                break
            sequence = waiting.popleft()
            self._running.append(sequence)
            budget -= self._add_chunk(rows, sequence, budget)
        waiting.extendleft(reversed(deferred))  # they keep their place in the queue
        ended, self._ended = tuple(self._ended), []
        # Released slots ride with a step that runs; with none, they wait for the next one.
        released = tuple(self.take_released_slots()) if rows else ()
        return StepPlan(tuple(rows), released, ended, tuple(copies), tuple(reused))

    def update(self, plan: StepPlan, sampled: Sequence[int | None]) -> list[SequenceOutput]:
        """Record a step's results: ``sampled[i]`` is the token row i's sequence picked (None
        for a row inside its prompt). Returns the tokens to deliver and the sequences that
        finished with them (stop token, max_new_tokens, a full slot); their slots are free."""
        if len(sampled) != len(plan.rows):
            raise ValueError(f"{len(sampled)} sampled tokens for a plan of {len(plan.rows)} rows")
        outputs: list[SequenceOutput] = []
        for scheduled, token in zip(plan.rows, sampled, strict=True):
            sequence = self._by_id.get(scheduled.seq_id)
            if sequence is None or sequence.done:
                continue  # cancelled while the step ran: its token is dropped
            sequence.computed = scheduled.row.start + len(scheduled.row.tokens)
            self._index(sequence)
            if token is None:
                continue
            request = sequence.request
            sequence.generated += 1
            sequence.last_token = token
            if self.limits.prefix_caching and sequence.cacheable:
                sequence.output.append(token)
            finished = (
                token in request.stop_token_ids
                or sequence.generated >= request.max_new_tokens
                or sequence.computed + 1 > self.limits.max_model_len
            )
            outputs.append(SequenceOutput(sequence.seq_id, token, finished))
            if finished:
                self._finish(sequence, None, report=False)
        self._drop_done()
        return outputs

    def fail(self, plan: StepPlan, error: TaskServeError) -> list[SequenceOutput]:
        """The step failed: every sequence in it ends with ``error`` (the others go on), and a
        slot its copies wrote into is not kept as a cached prefix (the copy may not have run)."""
        outputs = []
        for copy in plan.copies:
            if copy.dst in self._cached:
                del self._cached[copy.dst]
                self.prefixes.forget(copy.dst)
                self.slots.free(copy.dst)
                self._released.append(copy.dst)
        for scheduled in plan.rows:
            sequence = self._by_id.get(scheduled.seq_id)
            if sequence is not None and not sequence.done:
                outputs.append(SequenceOutput(sequence.seq_id, None, True, error))
                # What the failed call left in the slot is not trusted for reuse.
                self._finish(sequence, error, report=False, keep_prefix=False)
        self._drop_done()
        return outputs

    # -- internals -----------------------------------------------------------------------

    def _add_chunk(self, rows: list[ScheduledRow], sequence: _Sequence, budget: int) -> int:
        prompt = sequence.request.prompt
        size = min(self.chunk_size, budget, len(prompt) - sequence.computed)
        chunk = np.asarray(prompt[sequence.computed : sequence.computed + size], np.int64)
        encoder = sequence.request.encoder_states if sequence.computed == 0 else None
        row = StepRow(sequence.slot, chunk, sequence.computed, encoder)
        completes = sequence.computed + size >= len(prompt)
        rows.append(ScheduledRow(sequence.seq_id, row, completes, sequence.request.sampler))
        return size

    def _expire(self, now: float) -> None:
        for sequence in [*self._running, *self._waiting]:
            deadline = sequence.request.deadline
            if deadline is not None and now > deadline:
                error = DeadlineExceeded(
                    f"model {self.limits.name!r}: the deadline passed after {sequence.generated} tokens"
                )
                self._finish(sequence, error, report=True)
        self._drop_done()

    def _finish(
        self, sequence: _Sequence, error: TaskServeError | None, report: bool, keep_prefix: bool = True
    ) -> None:
        """The sequence leaves now: its slot is free for the next plan, or kept as a cached
        prefix (evictable) when it holds at least one whole block of computed positions. A
        cancelled sequence's slot may still be written by the step in flight, but only past
        ``computed``: the index holds only positions of steps whose results are in."""
        sequence.done = True
        self._by_id.pop(sequence.seq_id, None)
        if report:
            self._ended.append(SequenceOutput(sequence.seq_id, None, True, error))
        slot, sequence.slot = sequence.slot, -1
        if slot < 0:
            return
        if keep_prefix and self.prefixes.length(slot) >= self.limits.prefix_block:
            # Every position it computed, not only whole blocks: a hit extends past the last one.
            self.prefixes.hold(slot, sequence.tokens(), self._cacheable_length(sequence))
            self._cached[slot] = None  # the most recently used end
            return
        self.prefixes.forget(slot)
        self.slots.free(slot)
        self._released.append(slot)

    # -- the prefix cache ----------------------------------------------------------------

    def _index(self, sequence: _Sequence) -> None:
        """Register the sequence's computed positions once they fill a new whole block. Not the
        slot's last position: a step's dummy decode rows may write there (onnx_decoder.py)."""
        if not (self.limits.prefix_caching and sequence.cacheable):
            return
        block = self.limits.prefix_block
        length = self._cacheable_length(sequence)
        if length // block > self.prefixes.length(sequence.slot) // block:
            self.prefixes.hold(sequence.slot, sequence.tokens(), length)

    def _cacheable_length(self, sequence: _Sequence) -> int:
        return min(sequence.computed, self.limits.max_model_len - 1)

    def _wait_for_prefix(self, sequence: _Sequence, hit: PrefixHit | None) -> bool:
        """Whether the waiting sequence should wait for a prompt being computed now: a running
        sequence still in its prompt shares at least one more whole block with it than the
        cache holds yet (32 requests with one system prompt arriving together: the first
        computes it, the others copy it once its chunks are in, instead of each computing it
        too). That sequence is ahead in the prompt queue, so the wait is a few steps."""
        if not (self.limits.prefix_caching and sequence.cacheable):
            return False
        prompt = sequence.request.prompt
        have = hit.length if hit is not None else 0
        block = self.limits.prefix_block
        for running in self._running:
            if running.prefilled or not running.cacheable:
                continue
            shared = _shared_length(running.request.prompt, prompt, len(prompt) - 1)
            if shared >= have + block and shared > running.computed:
                return True
        return False

    def _admit(self, sequence: _Sequence, hit: PrefixHit | None, copies: list[PrefixCopy], reused: list[int]) -> bool:
        """Give the waiting sequence a slot, starting from ``hit``, the longest cached prefix of
        its prompt (``_best_prefix``). False: no slot now."""
        slot: int | None
        if (
            hit is not None
            and hit.slot in self._cached
            and (self.slots.num_free == 0 or hit.length >= self.prefixes.length(hit.slot))
        ):
            # An idle slot whose cache is the prefix (or when the alternative would evict):
            # take it over; it keeps its first positions, no copy.
            del self._cached[hit.slot]
            slot = hit.slot
        else:
            slot = self._take_slot()
            if slot is None:
                return False
        sequence.slot = slot
        if hit is not None:
            copies.append(PrefixCopy(hit.slot, slot, hit.length))
            if hit.slot in self._cached:
                self._cached.move_to_end(hit.slot)
            sequence.computed = hit.length
            self.prefixes.hold(slot, sequence.request.prompt, hit.length)
        if self.limits.prefix_caching and sequence.cacheable:
            reused.append(sequence.computed)
        return True

    def _best_prefix(self, sequence: _Sequence) -> PrefixHit | None:
        """The cached prefix to start from: at least one whole block, never the whole prompt
        (its last token must run to be sampled)."""
        if not (self.limits.prefix_caching and sequence.cacheable):
            return None
        prompt = sequence.request.prompt
        hits = self.prefixes.lookup(prompt)
        if not hits:
            return None
        longest = min(hits[0].length, len(prompt) - 1)
        if longest < self.limits.prefix_block:
            return None
        # Of the slots sharing the most, an idle cached one first (it may be taken over).
        best = next((h for h in hits if h.length >= longest and h.slot in self._cached), hits[0])
        return PrefixHit(best.slot, longest)

    def _take_slot(self) -> int | None:
        """A free slot, else the least recently used cached prefix's (evicted); None when every
        slot holds a running sequence."""
        slot = self.slots.allocate()
        if slot is None and self._cached:
            slot, _ = self._cached.popitem(last=False)
            self.prefixes.forget(slot)
        return slot

    def _drop_done(self) -> None:
        if any(s.done for s in self._running):
            self._running = [s for s in self._running if not s.done]
        if any(s.done for s in self._waiting):
            self._waiting = collections.deque(s for s in self._waiting if not s.done)


def _shared_length(a: tuple[int, ...], b: tuple[int, ...], limit: int) -> int:
    """Leading tokens ``a`` and ``b`` share, at most ``limit`` (slice compares: C speed)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # a[:lo] == b[:lo]; the answer lies in [lo, hi] (a[:hi] differs at first)
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
