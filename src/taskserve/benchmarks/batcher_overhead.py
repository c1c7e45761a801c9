"""In-process micro-benchmark of the dynamic batcher's own overhead.

A no-op runtime (echoes a per-row sum) sits behind the batcher; N concurrent
callers submit small token requests as fast as they can. It measures what the
batcher costs per request (queueing, padding, thread hand-off, splitting), not
model speed. Writes JSON when ``--json`` is given.

    .venv/bin/python -m taskserve.benchmarks.batcher_overhead --requests 20000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.serving.factory import create_scheduler


class EchoRuntime(Runtime):
    """Costs next to nothing, so the numbers are the batcher's."""

    def load(self) -> None:
        pass

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo("ids", "INT64", (-1, -1))]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo("total", "INT64", (-1,))]

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        return {"total": inputs["ids"].sum(axis=1)}


def config(max_batch_size: int, instances: int) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "echo",
            "max_batch_size": max_batch_size,
            "instance_count": instances,
            "inputs": [{"name": "ids", "datatype": "INT64", "dims": [-1]}],
            "outputs": [{"name": "total", "datatype": "INT64", "dims": []}],
            "dynamic_batching": {"max_queue_size": 0},
        }
    )


async def run(requests: int, concurrency: int, max_batch_size: int, instances: int) -> dict[str, Any]:
    cfg = config(max_batch_size, instances)
    scheduler = create_scheduler(cfg, [EchoRuntime() for _ in range(instances)], None)
    await scheduler.start()
    rng = np.random.default_rng(0)
    payloads = [InferRequest({"ids": rng.integers(0, 100, (1, int(n)))}) for n in rng.integers(4, 64, 256)]
    latencies: list[float] = []
    batch_sizes: list[int] = []
    remaining = requests

    async def caller(index: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            result = await scheduler.submit(payloads[(index + remaining) % len(payloads)])
            latencies.append(time.perf_counter() - start)
            batch_sizes.append(result.batch_size)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    await scheduler.stop()
    latencies.sort()
    return {
        "requests": len(latencies),
        "concurrency": concurrency,
        "max_batch_size": max_batch_size,
        "instances": instances,
        "seconds": elapsed,
        "requests_per_second": len(latencies) / elapsed,
        "latency_p50_us": latencies[len(latencies) // 2] * 1e6,
        "latency_p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        "mean_batch_size": statistics.fmean(batch_sizes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    results = [
        asyncio.run(run(args.requests, args.concurrency, size, args.instances))
        for size in args.max_batch_size
    ]
    for r in results:
        print(
            f"max_batch_size={r['max_batch_size']:>3}  {r['requests_per_second']:>9.0f} req/s  "
            f"p50 {r['latency_p50_us']:>8.0f} us  p99 {r['latency_p99_us']:>8.0f} us  "
            f"mean batch {r['mean_batch_size']:.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
