"""The generation engine's synchronous core, driven by hand (vLLM ``tests/v1/core`` style):
no runner, no threads, no clock. Each test builds a core, plans steps with ``schedule``
and answers them with hand-made sampled ids through ``update``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from taskserve.server.errors import DeadlineExceeded, InvalidInput, RuntimeFailure
from taskserve.server.runtimes.sampling import Sampling, TokenSampler
from taskserve.server.scheduling.engine_api import SequenceRequest
from taskserve.server.scheduling.engine_core import EngineCore, EngineLimits, SequenceOutput, StepPlan
from taskserve.server.scheduling.kv_slots import SlotAllocator


class _Never(TokenSampler):
    def pick(self, logits: np.ndarray) -> int:
        raise AssertionError("the core never picks tokens itself")


def _request(prompt: Sequence[int], new: int, **kwargs: object) -> SequenceRequest:
    return SequenceRequest(tuple(prompt), new, _Never(Sampling()), **kwargs)  # type: ignore[arg-type]


def _core(
    seqs: int = 4, budget: int = 64, chunk: int = 0, positions: int = 128, vocab: int = 1000
) -> EngineCore:
    return EngineCore(EngineLimits(seqs, positions, budget, chunk, vocab, "fake"))


def _next(plan: StepPlan) -> list[int | None]:
    """A stand-in model: each sampling row's next token is its last input token plus one."""
    return [int(r.row.tokens[-1]) + 1 if r.samples else None for r in plan.rows]


def _shape(plan: StepPlan) -> list[tuple[int, int, int]]:
    """(sequence, slot, tokens) per row."""
    return [(r.seq_id, r.row.slot, len(r.row.tokens)) for r in plan.rows]


def _tokens(outputs: list[SequenceOutput]) -> dict[int, int]:
    return {o.seq_id: o.token for o in outputs if o.token is not None}


def test_a_sequence_prefills_decodes_and_frees_its_slot_at_its_length() -> None:
    core = _core()
    a = core.add(_request([5, 6, 7], 3))
    plan = core.schedule(0.0)
    assert _shape(plan) == [(a, 0, 3)] and plan.rows[0].samples and plan.rows[0].row.start == 0
    assert _tokens(core.update(plan, [8])) == {a: 8}
    plan = core.schedule(0.0)
    assert _shape(plan) == [(a, 0, 1)] and plan.rows[0].row.start == 3
    assert list(plan.rows[0].row.tokens) == [8]
    core.update(plan, [9])
    plan = core.schedule(0.0)
    [last] = core.update(plan, [10])
    assert last == SequenceOutput(a, 10, True)
    assert core.num_unfinished == 0 and core.slots.num_free == 4
    # The slot's reset rides with the next step that runs.
    b = core.add(_request([1], 2))
    plan = core.schedule(0.0)
    assert plan.released_slots == (0,) and _shape(plan) == [(b, 0, 1)]


def test_a_stop_token_ends_the_sequence_with_it() -> None:
    core = _core()
    a = core.add(_request([1], 10, stop_token_ids=frozenset({3})))
    emitted = []
    while core.num_unfinished:
        plan = core.schedule(0.0)
        emitted += core.update(plan, _next(plan))
    assert [(o.token, o.finished) for o in emitted] == [(2, False), (3, True)]
    assert all(o.seq_id == a for o in emitted) and core.slots.num_free == 4


def test_decodes_come_first_and_prompts_share_the_rest_of_the_budget_in_chunks() -> None:
    core = _core(seqs=4, budget=8, chunk=4)
    a, b = core.add(_request([1], 20)), core.add(_request([2], 20))
    plan = core.schedule(0.0)
    core.update(plan, _next(plan))
    long = core.add(_request(range(100, 111), 2))  # 11 tokens
    short = core.add(_request([200, 201], 2))
    plan = core.schedule(0.0)
    # Two decode rows, then 6 tokens of budget: a 4-token chunk of the long prompt, then
    # the short prompt's 2 tokens: several sequences' prefill in one step, within the budget.
    assert _shape(plan) == [(a, 0, 1), (b, 1, 1), (long, 2, 4), (short, 3, 2)]
    assert plan.num_tokens == 8
    assert [r.samples for r in plan.rows] == [True, True, False, True]
    core.update(plan, _next(plan))
    plan = core.schedule(0.0)
    # The running streams keep their token per step; the long prompt goes on where it stopped.
    assert _shape(plan) == [(a, 0, 1), (b, 1, 1), (short, 3, 1), (long, 2, 4)]
    assert plan.rows[3].row.start == 4 and not plan.rows[3].samples
    core.update(plan, _next(plan))
    plan = core.schedule(0.0)
    assert _shape(plan)[-1] == (long, 2, 3) and plan.rows[-1].samples
    assert _tokens(core.update(plan, _next(plan)))[long] == 111


def test_one_step_admits_the_first_chunks_of_every_waiting_sequence_the_budget_covers() -> None:
    """What the runners batch into one prefill call: beside the running stream's decode row,
    the first chunks of three waiting prompts in arrival order, in consecutive slots; the
    fourth waits for budget, not for a slot."""
    core = _core(seqs=6, budget=16, chunk=8)
    running = core.add(_request([1], 20))
    core.update(plan := core.schedule(0.0), _next(plan))
    prompts = [core.add(_request(range(10 * k, 10 * k + n), 2)) for k, n in ((1, 5), (2, 3), (3, 9), (4, 4))]
    plan = core.schedule(0.0)
    # 1 decode token + 5 + 3, then 7 of the 9-token prompt (the budget's rest); the last waits.
    assert _shape(plan) == [(running, 0, 1), (prompts[0], 1, 5), (prompts[1], 2, 3), (prompts[2], 3, 7)]
    assert [r.row.start for r in plan.rows] == [1, 0, 0, 0] and plan.num_tokens == 16
    assert core.num_waiting == 1 and core.slots.num_free == 2


def test_every_step_stays_within_the_token_budget() -> None:
    core = _core(seqs=3, budget=5, chunk=4)
    ids = [core.add(_request([100 * k], 30)) for k in (1, 2)]
    ids.append(core.add(_request(range(500, 530), 3)))
    sizes = []
    while core.num_unfinished:
        plan = core.schedule(0.0)
        sizes.append(plan.num_tokens)
        core.update(plan, _next(plan))
    assert max(sizes) <= 5


def test_max_num_seqs_holds_the_rest_waiting_until_a_slot_frees_and_reuses_it() -> None:
    core = _core(seqs=2, budget=64)
    a, b, c = (core.add(_request([k], 1 if k == 1 else 3)) for k in (1, 2, 3))
    plan = core.schedule(0.0)
    assert _shape(plan) == [(a, 0, 1), (b, 1, 1)]
    assert core.num_running == 2 and core.num_waiting == 1
    outputs = core.update(plan, _next(plan))
    assert SequenceOutput(a, 2, True) in outputs  # a wanted one token: its slot is free now
    plan = core.schedule(0.0)
    assert _shape(plan) == [(b, 1, 1), (c, 0, 1)] and plan.released_slots == (0,)


def test_cancel_frees_the_slot_at_once_and_drops_the_token_in_flight() -> None:
    core = _core(seqs=1)
    a = core.add(_request([1], 100))
    waiting = core.add(_request([50], 2))
    plan = core.schedule(0.0)
    assert _shape(plan) == [(a, 0, 1)] and core.slots.num_free == 0
    assert core.cancel(a)
    assert core.slots.num_free == 1 and core.num_running == 0  # at once, while the step runs
    assert core.update(plan, _next(plan)) == []  # the step in flight: its token is dropped
    plan = core.schedule(0.0)
    assert _shape(plan) == [(waiting, 0, 1)] and plan.released_slots == (0,)
    assert not core.cancel(a)  # idempotent


def test_cancel_of_a_waiting_sequence_takes_it_out_of_the_queue() -> None:
    core = _core(seqs=1)
    core.add(_request([1], 5))
    queued = core.add(_request([2], 5))
    core.schedule(0.0)
    assert core.num_waiting == 1
    assert core.cancel(queued) and core.num_waiting == 0 and core.num_unfinished == 1
    assert core.slots.num_free == 0  # the running sequence keeps its slot


def test_a_passed_deadline_ends_the_sequence_and_frees_its_slot() -> None:
    core = _core(seqs=1)
    late = core.add(_request([1], 100, deadline=10.0))
    queued = core.add(_request([7], 2, deadline=10.0))
    plan = core.schedule(5.0)
    core.update(plan, _next(plan))
    plan = core.schedule(11.0)
    assert plan.rows == () and {o.seq_id for o in plan.ended} == {late, queued}
    assert all(isinstance(o.error, DeadlineExceeded) and o.finished for o in plan.ended)
    assert core.slots.num_free == 1 and core.num_unfinished == 0


def test_a_sequence_ends_when_its_slot_is_full() -> None:
    core = _core(positions=4)
    a = core.add(_request([1, 2], 3))  # 2 + 3 - 1 = 4 positions: fits exactly
    emitted = []
    while core.num_unfinished:
        plan = core.schedule(0.0)
        emitted += core.update(plan, _next(plan))
    assert [(o.token, o.finished) for o in emitted] == [(3, False), (4, False), (5, True)]
    assert all(o.seq_id == a for o in emitted)


def test_a_failed_step_ends_only_its_sequences() -> None:
    core = _core(seqs=1)
    a = core.add(_request([1], 5))
    b = core.add(_request([2], 1))
    plan = core.schedule(0.0)
    [failed] = core.fail(plan, RuntimeFailure("boom"))
    assert failed.seq_id == a and isinstance(failed.error, RuntimeFailure)
    plan = core.schedule(0.0)
    assert _shape(plan) == [(b, 0, 1)]


def test_requests_that_can_never_run_are_refused_alone() -> None:
    core = _core(positions=16, vocab=100)
    with pytest.raises(InvalidInput, match="cache positions"):
        core.add(_request(range(10), 8))
    for bad in ([1, 100], [-1, 2]):
        with pytest.raises(InvalidInput, match=r"token ids must lie in \[0, 100\)"):
            core.add(_request(bad, 2))
    with pytest.raises(InvalidInput, match="no tokens"):
        core.add(_request([], 2))
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        core.add(_request([1], 0))
    assert core.num_unfinished == 0


def test_update_refuses_a_result_of_the_wrong_length() -> None:
    core = _core()
    core.add(_request([1], 2))
    plan = core.schedule(0.0)
    with pytest.raises(ValueError, match="sampled tokens"):
        core.update(plan, [])


def test_abort_all_ends_every_sequence_and_frees_every_slot() -> None:
    core = _core(seqs=1)
    ids = {core.add(_request([1], 5)), core.add(_request([2], 5))}
    core.schedule(0.0)
    outputs = core.abort_all(RuntimeFailure("stopping"))
    assert {o.seq_id for o in outputs} == ids and core.num_unfinished == 0 and core.slots.num_free == 1


def test_the_slot_allocator_hands_out_the_lowest_free_slot() -> None:
    slots = SlotAllocator(3)
    assert [slots.allocate() for _ in range(3)] == [0, 1, 2] and slots.allocate() is None
    slots.free(2)
    slots.free(0)
    assert slots.allocate() == 0 and slots.num_free == 1 and slots.num_used == 2
    with pytest.raises(ValueError, match="not allocated"):
        slots.free(0 + 2 + 5)
