"""The generation engine's driver (its thread) over its core, with a fake runner whose next
token is the last input token plus one: tokens reach the streams, slots go back to the
runner on stop, cancel and deadline, decode rows share steps, the runner is never called
concurrently. The scheduling decisions themselves are tested synchronously in
test_engine_core.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest

from taskserve.server.errors import DeadlineExceeded, InvalidInput
from taskserve.server.repository.config import GenerationConfig
from taskserve.server.runtimes.generation import DecoderRunner, StepRow
from taskserve.server.runtimes.sampling import Sampling, TokenSampler, sample_rows
from taskserve.server.scheduling.generation_scheduler import GenerationScheduler, SequenceRequest

VOCAB = 1000


class FakeRunner:
    """Checks the engine's bookkeeping against its own (a slot's length must match each row's start)."""

    def __init__(self, slots: int = 8, positions: int = 256, step_s: float = 0.0) -> None:
        self.lengths = [0] * slots
        self.steps: list[list[StepRow]] = []
        self.released: list[int] = []
        self.step_s = step_s
        self.lock = threading.Lock()
        self.stepped = threading.Event()
        self._slots, self._positions = slots, positions

    @property
    def max_slots(self) -> int:
        return self._slots

    @property
    def max_model_len(self) -> int:
        return self._positions

    @property
    def vocab_size(self) -> int:
        return VOCAB

    @property
    def cache_bytes(self) -> int:
        return self._slots * self._positions

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        assert self.lock.acquire(blocking=False), "the runner was called concurrently"
        try:
            assert len({r.slot for r in rows}) == len(rows)
            logits = np.zeros((len(rows), VOCAB), np.float32)
            for i, row in enumerate(rows):
                assert row.start == self.lengths[row.slot], (row, self.lengths[row.slot])
                self.lengths[row.slot] = row.start + len(row.tokens)
                logits[i, (int(row.tokens[-1]) + 1) % VOCAB] = 1.0
            self.steps.append(list(rows))
            self.stepped.set()
            time.sleep(self.step_s)
            return logits
        finally:
            self.lock.release()

    def sample(self, rows: Sequence[StepRow], samplers: Sequence[TokenSampler | None]) -> list[int | None]:
        return sample_rows(self.step(rows), samplers)

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.released.append(slot)

    copies_prefixes = False  # the prefix cache with a runner: test_prefix_cache_engine.py

    def close(self) -> None:
        pass


def _request(prompt: Sequence[int], new: int, **kwargs: object) -> SequenceRequest:
    return SequenceRequest(tuple(prompt), new, TokenSampler(Sampling()), **kwargs)  # type: ignore[arg-type]


async def _engine(runner: FakeRunner, **settings: int) -> GenerationScheduler:
    checked: DecoderRunner = runner  # the fake satisfies the Protocol
    engine = GenerationScheduler("fake", GenerationConfig(**settings), checked)
    await engine.start()
    return engine


async def _collect(engine: GenerationScheduler, request: SequenceRequest) -> list[int]:
    return [t async for t in engine.generate(request)]


async def test_a_sequence_streams_its_tokens_and_frees_its_slot() -> None:
    runner = FakeRunner()
    engine = await _engine(runner)
    assert await _collect(engine, _request([5, 6, 7], 4)) == [8, 9, 10, 11]
    # Prompt in one step, then one decode step per token after the first.
    assert [[len(r.tokens) for r in step] for step in runner.steps] == [[3], [1], [1], [1]]
    assert engine.inflight_count() == 0 and engine.core.slots.num_free == 8
    await engine.stop()  # drains: the loop resets the freed slot on the runner first
    assert runner.released == [0]


async def test_stop_token_ends_the_sequence_with_it() -> None:
    engine = await _engine(FakeRunner())
    assert await _collect(engine, _request([1], 10, stop_token_ids=frozenset({4}))) == [2, 3, 4]
    await engine.stop()


async def test_max_num_seqs_bounds_the_running_set_and_all_decode_rows_share_one_step() -> None:
    runner = FakeRunner(step_s=0.001)
    engine = await _engine(runner, max_num_seqs=3, max_num_batched_tokens=64)
    prompts = [[10 * i + 1, 10 * i + 2] for i in range(5)]
    results = await asyncio.gather(*(_collect(engine, _request(p, 6)) for p in prompts))
    assert results == [list(range(p[-1] + 1, p[-1] + 7)) for p in prompts]
    assert max(len(step) for step in runner.steps) == 3
    assert {r.slot for step in runner.steps for r in step} == {0, 1, 2}
    # With three sequences decoding, each step carried all three decode rows.
    assert any(sum(len(r.tokens) == 1 for r in step) == 3 for step in runner.steps)
    assert engine.inflight_count() == 0
    await engine.stop()
    assert len(runner.released) == 5


async def test_cancel_frees_the_slot_for_a_waiting_sequence() -> None:
    runner = FakeRunner(step_s=0.002)
    engine = await _engine(runner, max_num_seqs=1, max_num_batched_tokens=16)
    stream = engine.generate(_request([1], 200))
    waiting = asyncio.ensure_future(_collect(engine, _request([500], 3)))
    got = []
    async for token in stream:
        got.append(token)
        if len(got) == 2:
            break  # leaving the loop closes the stream: the engine cancels the sequence
    assert await asyncio.wait_for(waiting, 5) == [501, 502, 503]
    assert got == [2, 3] and runner.released[0] == 0
    # The cancelled sequence stopped soon: far fewer than its 200 tokens were computed.
    assert sum(1 for s in runner.steps for r in s if r.tokens[0] < 500) < 20
    await engine.stop()


async def test_cancelling_a_stream_frees_its_slot_at_once() -> None:
    """What ends the streams of clients that stopped reading: the slot is free when cancel returns."""
    runner = FakeRunner(step_s=0.002)
    engine = await _engine(runner, max_num_seqs=1, max_num_batched_tokens=16)
    stream = engine.generate(_request([1], 200))
    tokens = aiter(stream)
    assert await anext(tokens) == 2
    assert engine.core.slots.num_free == 0
    stream.cancel()
    assert engine.core.slots.num_free == 1 and engine.inflight_count() == 0
    with pytest.raises(StopAsyncIteration):
        await anext(tokens)
    assert await _collect(engine, _request([500], 2)) == [501, 502]
    assert runner.released[0] == 0
    await engine.stop()


async def test_deadline_ends_a_running_sequence_and_frees_its_slot() -> None:
    runner = FakeRunner(step_s=0.002)
    engine = await _engine(runner, max_num_seqs=1, max_num_batched_tokens=16)
    with pytest.raises(DeadlineExceeded):
        await _collect(engine, _request([1], 250, deadline=time.monotonic() + 0.05))
    assert engine.core.slots.num_free == 1
    assert await _collect(engine, _request([7], 2)) == [8, 9]
    await engine.stop()
    assert runner.released == [0, 0]


async def test_sequences_longer_than_a_slot_are_refused() -> None:
    engine = await _engine(FakeRunner(positions=16), max_model_len=4096)
    with pytest.raises(InvalidInput, match="cache positions"):
        engine.generate(_request(list(range(10)), 8))
    await engine.stop()


async def test_a_prompt_outside_the_vocabulary_is_refused_alone() -> None:
    """Checked before it joins a step: inside one, its row would fail every sequence there."""
    runner = FakeRunner()
    engine = await _engine(runner)
    running = asyncio.ensure_future(_collect(engine, _request([5, 6], 6)))
    for bad in ([1, VOCAB], [-1, 2]):
        with pytest.raises(InvalidInput, match=rf"token ids must lie in \[0, {VOCAB}\)"):
            engine.generate(_request(bad, 2))
    assert await running == [7, 8, 9, 10, 11, 12]
    assert all(int(r.tokens.max()) < VOCAB for step in runner.steps for r in step)
    await engine.stop()


def test_config_checks_the_budget() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        GenerationConfig(max_num_seqs=32, max_num_batched_tokens=16)
    with pytest.raises(ValueError, match="prefill_chunk_size"):
        GenerationConfig(max_num_batched_tokens=64, prefill_chunk_size=128)
    from taskserve.server.repository.config import ModelConfig

    with pytest.raises(ValueError, match="instance_count: 1"):
        ModelConfig.model_validate({"name": "m", "instance_count": 2, "generation": {}})
    assert ModelConfig.model_validate({"name": "m", "generation": {"max_num_seqs": 4}}).generation == GenerationConfig(
        max_num_seqs=4
    )


async def test_stop_without_drain_ends_every_stream_and_is_idempotent() -> None:
    from taskserve.server.errors import ModelNotReady

    runner = FakeRunner(step_s=0.002)
    engine = await _engine(runner, max_num_seqs=1, max_num_batched_tokens=16)
    streams = [asyncio.ensure_future(_collect(engine, _request([k], 200))) for k in (1, 2)]
    assert await asyncio.to_thread(runner.stepped.wait, 10)
    await engine.stop(drain=False)
    await engine.stop(drain=False)
    for stream in streams:
        with pytest.raises(ModelNotReady):
            await stream
    assert engine.inflight_count() == 0
    with pytest.raises(ModelNotReady):
        engine.generate(_request([1], 2))


async def test_a_failure_of_the_engine_thread_ends_every_stream_and_refuses_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug outside a step (here in planning) must not leave streams waiting forever."""
    from taskserve.server.errors import RuntimeFailure

    runner = FakeRunner(step_s=0.002)
    engine = await _engine(runner, max_num_seqs=1, max_num_batched_tokens=16)
    stream = asyncio.ensure_future(_collect(engine, _request([1], 200)))
    assert await asyncio.to_thread(runner.stepped.wait, 10)

    def broken(now: float) -> object:
        raise AssertionError("a planning bug")

    monkeypatch.setattr(engine.core, "schedule", broken)
    with pytest.raises(RuntimeFailure, match="generation engine failed"):
        await asyncio.wait_for(stream, 10)
    with pytest.raises(RuntimeFailure, match="reload the model"):
        engine.generate(_request([1], 2))
    assert engine.idle and engine.inflight_count() == 0
    await engine.stop()  # still closes the runner
