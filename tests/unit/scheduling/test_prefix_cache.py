"""The engine core's prefix cache, driven by hand (vLLM ``tests/v1/core`` style): no runner,
no threads, no clock. A finished sequence's slot stays as a cached prefix; a prompt that
starts with cached tokens is admitted with them copied (``StepPlan.copies``) or with the
idle slot taken over, and prefills only the rest; eviction is least recently used first
and never touches a running sequence."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from taskserve.server.errors import RuntimeFailure
from taskserve.server.runtimes.sampling import Sampling, TokenSampler
from taskserve.server.scheduling.engine_api import SequenceRequest
from taskserve.server.scheduling.engine_core import EngineCore, EngineLimits, PrefixCopy, StepPlan, _shared_length
from taskserve.server.scheduling.prefix_cache import PrefixIndex

BLOCK = 16


class _Never(TokenSampler):
    def pick(self, logits: np.ndarray) -> int:
        raise AssertionError("the core never picks tokens itself")


def _request(prompt: Sequence[int], new: int, **kwargs: object) -> SequenceRequest:
    return SequenceRequest(tuple(prompt), new, _Never(Sampling()), **kwargs)  # type: ignore[arg-type]


def _core(seqs: int = 4, budget: int = 256, chunk: int = 0, positions: int = 256, cache: bool = True) -> EngineCore:
    return EngineCore(EngineLimits(seqs, positions, budget, chunk, 1000, "fake", prefix_caching=cache))


def _next(plan: StepPlan) -> list[int | None]:
    return [(int(r.row.tokens[-1]) + 1) % 1000 if r.samples else None for r in plan.rows]


def _run(core: EngineCore) -> None:
    """Steps until every sequence ended."""
    while core.num_unfinished:
        plan = core.schedule(0.0)
        core.update(plan, _next(plan))


def _finished(core: EngineCore, prompt: Sequence[int], new: int = 2) -> int:
    """Run one sequence to its end; the slot it held."""
    core.add(_request(prompt, new))
    plan = core.schedule(0.0)
    slot = plan.rows[-1].row.slot
    core.update(plan, _next(plan))
    _run(core)
    return slot


PROMPT = tuple(range(100, 140))  # 40 tokens: two whole blocks and 8 more


def test_a_finished_sequence_keeps_its_slot_as_a_cached_prefix() -> None:
    core = _core()
    slot = _finished(core, PROMPT)
    assert core.num_cached_prefixes == 1 and core.slots.num_free == 3
    # Its prompt plus the generated token fed back: 41 positions computed.
    assert core.prefixes.length(slot) == 41
    plan = core.schedule(0.0)
    assert plan.released_slots == () and core.take_released_slots() == []


def test_a_partial_hit_copies_the_shared_positions_and_prefills_only_the_rest() -> None:
    core = _core()
    source = _finished(core, PROMPT)
    b = core.add(_request(PROMPT[:35] + (7, 8, 9), 3))
    plan = core.schedule(0.0)
    # The cached slot holds more than b shares and a free slot exists: copy, keep the longer prefix.
    [row] = plan.rows
    assert row.seq_id == b and row.row.slot != source and row.row.start == 35
    assert list(row.row.tokens) == [7, 8, 9] and row.samples
    assert plan.copies == (PrefixCopy(source, row.row.slot, 35),) and plan.prefix_reused == (35,)
    assert core.num_cached_prefixes == 1  # still there for the next prompt


def test_an_idle_slot_whose_cache_is_the_whole_prefix_is_taken_over_without_a_copy() -> None:
    core = _core()
    source = _finished(core, PROMPT)  # holds PROMPT + [140] (its first token, fed back)
    core.add(_request(PROMPT + (140, 5, 6), 2))
    plan = core.schedule(0.0)
    [row] = plan.rows
    assert row.row.slot == source and row.row.start == 41 and list(row.row.tokens) == [5, 6]
    assert plan.copies == (PrefixCopy(source, source, 41),)
    assert core.num_cached_prefixes == 0 and core.slots.num_free == 3


def test_the_last_prompt_token_is_always_computed() -> None:
    core = _core()
    _finished(core, PROMPT)
    a = core.add(_request(PROMPT, 2))
    plan = core.schedule(0.0)
    [row] = plan.rows
    assert row.seq_id == a and row.row.start == 39 and list(row.row.tokens) == [139] and row.samples
    assert plan.prefix_reused == (39,)


def test_hits_start_at_one_whole_block() -> None:
    core = _core()
    _finished(core, PROMPT)
    core.add(_request(PROMPT[:15] + (1, 2, 3), 1))  # 15 shared tokens: less than a block
    plan = core.schedule(0.0)
    assert plan.copies == () and plan.rows[0].row.start == 0 and plan.prefix_reused == (0,)
    core.update(plan, _next(plan))
    core.add(_request(PROMPT[:16] + (1, 2, 3), 1))  # exactly one block
    plan = core.schedule(0.0)
    assert plan.rows[0].row.start == 16 and plan.prefix_reused == (16,)
    core.update(plan, _next(plan))
    core.add(_request(PROMPT[:16], 1))  # the whole prompt is one block: its last token must run
    plan = core.schedule(0.0)
    assert plan.rows[0].row.start == 0 and plan.prefix_reused == (0,)


def test_a_sequence_shorter_than_a_block_is_not_cached_and_its_slot_is_released() -> None:
    core = _core()
    slot = _finished(core, range(10), new=3)
    assert core.num_cached_prefixes == 0 and core.slots.num_free == 4
    assert core.take_released_slots() == [slot]


def test_a_running_sequence_shares_its_computed_prompt_and_keeps_running() -> None:
    core = _core()
    a = core.add(_request(PROMPT, 50))
    plan = core.schedule(0.0)
    core.update(plan, _next(plan))  # a's prompt computed, a decoding
    b = core.add(_request(PROMPT[:32] + (9,) * 4, 2))
    plan = core.schedule(0.0)
    rows = {r.seq_id: r.row for r in plan.rows}
    assert rows[a].start == 40 and len(rows[a].tokens) == 1  # a's decode row: untouched
    assert plan.copies == (PrefixCopy(rows[a].slot, rows[b].slot, 32),) and rows[b].start == 32
    assert core.num_cached_prefixes == 0


def test_a_prompt_being_computed_is_shared_once_its_chunks_are_in_and_the_sharer_waits_for_them() -> None:
    core = _core(chunk=BLOCK, budget=64)
    a = core.add(_request(PROMPT, 4))
    b = core.add(_request(PROMPT[:32] + (1,), 2))
    other = core.add(_request(range(600, 620), 2))
    plan = core.schedule(0.0)
    # b shares 32 positions with a's prompt, none computed yet: b waits; the sequence behind it does not.
    assert {r.seq_id for r in plan.rows} == {a, other} and core.num_waiting == 1
    core.update(plan, _next(plan))  # a: 16 positions computed
    plan = core.schedule(0.0)
    # A chunk planned in this very step (a's 16..31) is never shared before it comes back.
    assert b not in {r.seq_id for r in plan.rows} and plan.copies == ()
    core.update(plan, _next(plan))  # a: 32 computed
    plan = core.schedule(0.0)
    rows = {r.seq_id: r.row for r in plan.rows}
    assert rows[b].start == 32 and list(rows[b].tokens) == [1]
    assert plan.copies == (PrefixCopy(rows[a].slot, rows[b].slot, 32),) and plan.prefix_reused == (32,)


def test_without_the_cache_nothing_waits_for_a_shared_prompt() -> None:
    core = _core(chunk=BLOCK, budget=64, cache=False)
    a = core.add(_request(PROMPT, 4))
    b = core.add(_request(PROMPT[:32] + (1,), 2))
    assert {r.seq_id for r in core.schedule(0.0).rows} == {a, b}


def test_a_cancelled_sequence_caches_only_the_positions_whose_step_came_back() -> None:
    core = _core(chunk=BLOCK, budget=64)
    a = core.add(_request(PROMPT, 4))
    plan = core.schedule(0.0)
    core.update(plan, _next(plan))  # 16 computed
    in_flight = core.schedule(0.0)  # 16..31 being computed
    assert core.cancel(a)
    core.update(in_flight, _next(in_flight))  # the cancelled row's result is dropped
    assert core.num_cached_prefixes == 1
    core.add(_request(PROMPT, 2))
    plan = core.schedule(0.0)
    assert plan.rows[0].row.start == BLOCK and plan.prefix_reused == (BLOCK,)


def test_a_sequence_cancelled_before_any_step_came_back_leaves_nothing() -> None:
    core = _core()
    a = core.add(_request(PROMPT, 4))
    plan = core.schedule(0.0)
    core.cancel(a)
    core.update(plan, _next(plan))
    assert core.num_cached_prefixes == 0 and core.slots.num_free == 4
    core.add(_request(PROMPT, 2))
    assert core.schedule(0.0).prefix_reused == (0,)


def test_a_failed_step_leaves_no_cached_prefix_behind() -> None:
    core = _core()
    _finished(core, PROMPT)
    core.add(_request(PROMPT[:32] + (5,), 2))
    plan = core.schedule(0.0)
    [failed] = core.fail(plan, RuntimeFailure("boom"))
    assert failed.finished and core.num_cached_prefixes == 1  # the source stays; the copy's target does not
    assert core.slots.num_free == 3


def test_eviction_takes_the_least_recently_used_prefix_first() -> None:
    core = _core(seqs=3)
    other = tuple(range(500, 540))
    slot_a = _finished(core, PROMPT)
    slot_b = _finished(core, other)
    # A hit on a's prefix (copied into the free slot) makes it the most recently used.
    slot_c = _finished(core, PROMPT[:20] + (1, 2, 3, 4), new=1)
    assert len({slot_a, slot_b, slot_c}) == 3 and core.num_cached_prefixes == 3
    core.add(_request(range(700, 720), 1))  # no hit, no free slot: evict the oldest, b
    plan = core.schedule(0.0)
    assert plan.rows[0].row.slot == slot_b and plan.copies == ()
    core.update(plan, _next(plan))
    core.add(_request(other[:33], 1))
    assert core.schedule(0.0).prefix_reused == (0,)  # b's prefix is gone


def test_a_running_sequence_is_never_evicted_for_a_prompt() -> None:
    core = _core(seqs=2)
    cached = _finished(core, PROMPT)
    runner = core.add(_request(range(300, 340), 100))  # the free slot
    plan = core.schedule(0.0)
    core.update(plan, _next(plan))
    first = core.add(_request(range(800, 820), 100))
    plan = core.schedule(0.0)
    slots = {r.seq_id: r.row.slot for r in plan.rows}
    assert slots[first] == cached  # the cached prefix gave way
    core.update(plan, _next(plan))
    waiting = core.add(_request(range(900, 920), 5))
    for _ in range(5):
        plan = core.schedule(0.0)
        assert {r.seq_id for r in plan.rows} == {runner, first}  # both keep running; the new one waits
        assert plan.copies == ()
        core.update(plan, _next(plan))
    assert core.num_waiting == 1 and waiting not in {r.seq_id for r in plan.rows}


def test_the_cache_off_frees_slots_and_never_copies() -> None:
    core = _core(cache=False)
    slot = _finished(core, PROMPT)
    assert core.num_cached_prefixes == 0 and core.take_released_slots() == [slot]
    core.add(_request(PROMPT, 2))
    plan = core.schedule(0.0)
    assert plan.copies == () and plan.rows[0].row.start == 0 and plan.prefix_reused == ()


def test_encoder_decoder_sequences_are_never_cached_or_served_from_the_cache() -> None:
    core = _core()
    states = np.zeros((3, 4), np.float32)
    slot = _finished_with(core, _request(PROMPT, 2, encoder_states=states))
    assert core.num_cached_prefixes == 0 and core.take_released_slots() == [slot]
    _finished(core, PROMPT)
    core.add(_request(PROMPT, 2, encoder_states=states))
    plan = core.schedule(0.0)
    assert plan.copies == () and plan.rows[0].row.start == 0


def _finished_with(core: EngineCore, request: SequenceRequest) -> int:
    core.add(request)
    plan = core.schedule(0.0)
    slot = plan.rows[-1].row.slot
    core.update(plan, _next(plan))
    _run(core)
    return slot


def test_the_slots_last_position_is_never_cached() -> None:
    """Decode steps' dummy rows may write at a full slot's last position (onnx_decoder.py)."""
    core = _core(positions=32)
    slot = _finished(core, range(100, 120), new=13)  # computes all 32 positions (100..131)
    assert core.prefixes.length(slot) == 31


def test_the_index_checks_tokens_and_extends_a_hit_past_its_last_whole_block() -> None:
    index = PrefixIndex(4)
    index.hold(3, (1, 2, 3, 4, 5, 6, 7), 7)
    [hit] = index.lookup((1, 2, 3, 4, 5, 6, 9))
    assert (hit.slot, hit.length) == (3, 6)
    assert index.lookup((1, 2, 3, 5, 5, 6)) == []
    index.hold(3, (1, 2, 3, 4, 8), 5)  # a new owner: the old blocks past its prefix go
    assert index.lookup((1, 2, 3, 4, 5, 6, 7))[0].length == 4
    index.forget(3)
    assert index.lookup((1, 2, 3, 4, 5)) == [] and 3 not in index


def test_shared_length_finds_the_first_difference() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = tuple(int(t) for t in rng.integers(0, 3, int(rng.integers(0, 12))))
        b = tuple(int(t) for t in rng.integers(0, 3, int(rng.integers(0, 12))))
        limit = int(rng.integers(0, 14))
        want = 0
        while want < min(len(a), len(b), limit) and a[want] == b[want]:
            want += 1
        assert _shared_length(a, b, limit) == want


class _Runner:
    """Just what the engine reads at construction."""

    max_slots, max_model_len, vocab_size = 4, 64, 100

    def __init__(self, copies: bool) -> None:
        self.copies_prefixes = copies


def test_the_config_switch_defaults_on_and_needs_a_runner_that_copies() -> None:
    from taskserve.server.repository.config import GenerationConfig, ModelConfig
    from taskserve.server.scheduling.generation_scheduler import GenerationScheduler

    assert GenerationConfig().prefix_caching is True
    off = ModelConfig.model_validate({"name": "m", "generation": {"prefix_caching": False}}).generation
    assert off is not None and off.prefix_caching is False

    def engine(settings: GenerationConfig, copies: bool) -> bool:
        return GenerationScheduler("m", settings, _Runner(copies)).core.limits.prefix_caching  # type: ignore[arg-type]

    assert engine(GenerationConfig(), True) is True
    assert engine(off, True) is False
    assert engine(GenerationConfig(), False) is False  # encoder-decoders: no prefix cache
