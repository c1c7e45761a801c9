"""A batch that starts while nothing else of the model computes or waits is marked
alone (``Runtime.infer_alone``: every core); batches that overlap are not."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from .fakes import FakeRuntime
from .harness import batcher, running, started, token_config, tokens


class WidthRecorder(FakeRuntime):
    """Records, per batch, whether the batcher asked for the alone (wide) path."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__(gate=gate)
        self.alone: list[bool] = []

    def infer_alone(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        with self.lock:
            self.alone.append(True)
        return super().infer(inputs, output_names)

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        with self.lock:
            self.alone.append(False)
        return super().infer(inputs, output_names)


async def test_requests_one_after_another_each_run_alone() -> None:
    runtimes = [WidthRecorder(), WidthRecorder()]
    async with running(batcher(token_config(instance_count=2), runtimes)) as s:
        for first in (1, 10, 20):
            await asyncio.wait_for(s.submit(tokens(3, first=first)), 30)
    assert runtimes[0].alone == [True, True, True]
    assert runtimes[1].alone == []


async def test_a_batch_that_overlaps_another_runs_narrow() -> None:
    gate = threading.Event()
    busy, other = WidthRecorder(gate=gate), WidthRecorder()
    async with running(batcher(token_config(instance_count=2, max_batch_size=1), [busy, other]), gate) as s:
        first = asyncio.create_task(s.submit(tokens(2, first=1)))
        await started(busy)
        # The first batch still computes: the second must not take every core.
        await asyncio.wait_for(s.submit(tokens(2, first=10)), 30)
        gate.set()
        await first
    assert busy.alone == [True]
    assert other.alone == [False]


async def test_a_batch_with_others_still_queued_runs_narrow() -> None:
    gate = threading.Event()
    runtime = WidthRecorder(gate=gate)
    async with running(batcher(token_config(max_batch_size=1), [runtime]), gate) as s:
        calls = [asyncio.create_task(s.submit(tokens(2, first=f))) for f in (1, 10, 20)]
        await started(runtime)
        gate.set()
        await asyncio.gather(*calls)
        # The first two started with others waiting or computing (whether the third overlaps
        # the second depends on thread timing); a later lone request is alone again.
        await asyncio.wait_for(s.submit(tokens(2, first=30)), 30)
    assert runtime.alone[:2] == [False, False]
    assert runtime.alone[-1] is True and len(runtime.alone) == 4
