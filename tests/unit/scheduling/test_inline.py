"""Tiny models run on the event loop once their measured cost is below inline_compute_us."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from taskserve.server.errors import RuntimeFailure
from taskserve.server.metrics import ServerMetrics

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


async def test_inline_requests_get_their_outputs_metrics_and_errors() -> None:
    metrics = ServerMetrics()
    runtime = FakeRuntime(fail=lambda inputs: int(inputs["ids"][0, 0]) == 99)
    config = token_config(dynamic_batching={"inline_compute_us": 10_000})
    async with running(batcher(config, [runtime], metrics.for_model("tokens", "1"))) as b:
        await b.submit(tokens(2))  # measured on the instance thread
        subset = await b.submit(tokens(3, first=5, output_names=("pooled",)))
        with pytest.raises(RuntimeFailure, match="model 'tokens' failed"):
            await b.submit(tokens(3, first=99))
        after = await b.submit(tokens(4, first=1))  # a failure inline leaves the batcher serving
        assert b.inflight_count() == 0
    assert threading.get_ident() in runtime.threads
    assert set(subset.outputs) == {"pooled"} and subset.outputs["pooled"][0] == 6.0  # mean of 5, 6, 7
    np.testing.assert_array_equal(after.outputs["length"], [4])

    def value(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"model": "tokens", "version": "1"})

    assert value("taskserve_execution_count_total") == 3  # the failed batch is not counted
    assert value("taskserve_queue_duration_seconds_count") == 3
    assert value("taskserve_pending_requests") == 0


def test_inline_row_limit_follows_the_measured_cost() -> None:
    from taskserve.server.scheduling.execution import Instance

    instance = Instance(0, FakeRuntime(), "m", inline_compute_s=0.001)
    assert instance.inline_rows == 0  # nothing measured yet: never inline
    instance.record(0.0004, 4)  # 100 us per row -> 10 rows fit in 1 ms
    assert instance.inline_rows == 10
    instance.record(0.05, 1)  # one slow batch moves the estimate up at once
    assert instance.inline_rows == 0
    disabled = Instance(1, FakeRuntime(), "m")
    disabled.record(1e-9, 1)
    assert disabled.inline_rows == 0
    instance.executor.shutdown()
    disabled.executor.shutdown()
