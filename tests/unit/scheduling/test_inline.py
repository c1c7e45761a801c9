"""Tiny models run on the event loop once their measured cost is below inline_compute_us."""

from __future__ import annotations

import threading
import time

import numpy as np

from .fakes import FakeRuntime, masked_outputs
from .harness import batcher, running, token_config, tokens


async def test_fast_model_runs_inline_after_its_first_batch() -> None:
    runtime = FakeRuntime()
    async with running(batcher(token_config(dynamic_batching={"inline_compute_us": 10_000}), [runtime])) as b:
        results = [await b.submit(tokens(n, first=n)) for n in (3, 4, 5)]
    loop_thread = threading.get_ident()
    # The first batch measured the cost on the instance thread; the rest ran on the loop.
    assert loop_thread in runtime.threads and len(runtime.threads) == 2
    for n, result in zip((3, 4, 5), results, strict=True):
        np.testing.assert_array_equal(result.outputs["length"], [n])
        assert result.outputs["hidden"].shape == (1, n, 2)


async def test_inline_disabled_keeps_batches_on_the_instance_thread() -> None:
    runtime = FakeRuntime()
    async with running(batcher(token_config(dynamic_batching={"inline_compute_us": 0}), [runtime])) as b:
        for n in (3, 4, 5):
            await b.submit(tokens(n))
    assert threading.get_ident() not in runtime.threads


async def test_slow_model_never_runs_inline() -> None:
    def slow(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        time.sleep(0.005)  # 5 ms per batch, far above the 100 us threshold
        return masked_outputs(inputs)

    runtime = FakeRuntime(compute=slow)
    async with running(batcher(token_config(dynamic_batching={"inline_compute_us": 100}), [runtime])) as b:
        for n in (3, 4, 5):
            await b.submit(tokens(n))
    assert threading.get_ident() not in runtime.threads
