"""Builders shared by the batcher tests: a config, a running batcher, waits."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np

from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import ModelConfig
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.scheduling.batcher import DynamicBatcher
from taskserve.server.scheduling.layout import TensorLayout
from taskserve.server.scheduling.policy import BatchPolicy

from .fakes import FakeRuntime


def token_config(**overrides: Any) -> ModelConfig:
    """A token model: ``ids``/``mask`` [-1] in; ``hidden`` [-1, 2] (follows ids), ``pooled``, ``length`` out."""
    data: dict[str, Any] = {
        "name": "tokens",
        "max_batch_size": 8,
        "inputs": [
            {"name": "ids", "datatype": "INT64", "dims": [-1], "pad_value": 7},
            {"name": "mask", "datatype": "INT64", "dims": [-1], "pad_value": 0},
        ],
        "outputs": [
            {"name": "hidden", "datatype": "FP32", "dims": [-1, 2], "unpad_like": "ids"},
            {"name": "pooled", "datatype": "FP32", "dims": []},
            {"name": "length", "datatype": "INT64", "dims": []},
        ],
    }
    # Inline execution off unless a test asks: gated fake runtimes must stay on their threads.
    batching = {"inline_compute_us": 0, **overrides.pop("dynamic_batching", {})}
    data.update(overrides)
    data["dynamic_batching"] = batching
    return ModelConfig.model_validate(data)


def tokens(*lengths: int, first: int = 1, rows: int = 1, **fields: Any) -> InferRequest:
    """A request of ``rows`` rows; row r has ``lengths[r % len]`` tokens ids first.. and a full mask,
    padded by the caller's own mask (0) up to its longest row."""
    width = max(lengths)
    ids = np.zeros((rows, width), np.int64)
    mask = np.zeros((rows, width), np.int64)
    for r in range(rows):
        n = lengths[r % len(lengths)]
        ids[r, :n] = np.arange(first + 100 * r, first + 100 * r + n)
        mask[r, :n] = 1
    return InferRequest(inputs={"ids": ids, "mask": mask}, **fields)


def batcher(
    config: ModelConfig,
    runtimes: Sequence[FakeRuntime],
    metrics: ModelMetrics | None = None,
    clock: Callable[[], float] | None = None,
) -> DynamicBatcher:
    layout = TensorLayout.from_config(config, runtimes[0].inputs, runtimes[0].outputs)
    kwargs: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return DynamicBatcher(layout, BatchPolicy.from_config(config), runtimes, metrics, **kwargs)


@contextlib.asynccontextmanager
async def running(scheduler: DynamicBatcher, *gates: threading.Event) -> AsyncIterator[DynamicBatcher]:
    """Start ``scheduler``; on the way out open ``gates`` so nothing stays blocked, then stop it."""
    await scheduler.start()
    try:
        yield scheduler
    finally:
        for gate in gates:
            gate.set()
        await asyncio.wait_for(scheduler.stop(), 30)


async def started(runtime: FakeRuntime, count: int = 1) -> None:
    """Wait until ``runtime`` began ``count`` more infer calls (a hang guard, not a timing check)."""
    for _ in range(count):
        ok = await asyncio.to_thread(runtime.started.acquire, True, 30)
        assert ok, "the runtime never started the expected batch"


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until ``condition`` holds (gives up after 30 s)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while not condition():
        assert loop.time() < end, f"gave up waiting for: {what}"
        await asyncio.sleep(0.001)


async def dispatched(scheduler: DynamicBatcher) -> None:
    """Wait until the batching loop has looked at every request submitted so far: each
    submit sets its wake-up event, and the loop clears it right before it dispatches, with
    no await between. A barrier for "it chose to wait", where a sleep would only hope so."""
    await until(lambda: not scheduler._wake.is_set(), "the batcher to look at its queue")
