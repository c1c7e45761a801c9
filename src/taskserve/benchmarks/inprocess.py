"""The ceiling: the same model run by the server's own ONNX Runtime wrapper, in this process, no server.

Same session settings as the server (the model's config.yaml: threads, graph
optimization, providers), requests stacked and padded by the server's collate,
one thread per model instance; only gRPC, the queue and the tasks are missing.
A sweep over batch sizes finds the batch size with the highest throughput.

Two baselines: consecutive requests stacked as they come (padded to the longest
of them), and ``bucketed``: batches formed within the config's length buckets,
as the server's batcher forms them, so a batch of short sentences is not padded
to a long one. Only the second does the same work as the server; both are
reported so a ratio against either can be read.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

from taskserve.benchmarks.loadgen import Recorder, WindowPlan
from taskserve.benchmarks.payloads import Request
from taskserve.benchmarks.stats import RunResult, Window, choose_measured, is_stable
from taskserve.clients.metadata import TensorMetadata

SERVER_LABEL = "onnxruntime in-process"
BUCKETED_LABEL = "onnxruntime in-process, length-bucketed"


class _LockedRecorder(Recorder):
    """A Recorder that instance threads may share."""

    def __init__(self, items_per_request: int) -> None:
        super().__init__(items_per_request)
        self._lock = threading.Lock()

    def ok(self, latency_s: float) -> None:
        with self._lock:
            super().ok(latency_s)

    def fail(self, code: str, latency_s: float | None = None) -> None:
        with self._lock:
            super().fail(code, latency_s)

    def take(self) -> Window:
        with self._lock:
            return super().take()


def latest_model_file(model_dir: Path, filename: str, version: str = "") -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if version:
        versions = [v for v in versions if str(v) == version]
    if not versions:
        raise FileNotFoundError(f"{model_dir} has no numbered version directory{' ' + version if version else ''}")
    return model_dir / str(versions[-1]) / filename


class InProcessModel:
    """The model's runtime instances, loaded as the server would load them."""

    def __init__(self, model_dir: Path, version: str = "", instances: int | None = None) -> None:
        # Server imports stay here: the light client install has no onnxruntime or pydantic.
        from taskserve.server.repository.config import load_model_config
        from taskserve.server.runtimes.onnx import OnnxRuntime
        from taskserve.server.scheduling.layout import TensorLayout

        self.config = load_model_config(model_dir)
        self.path = latest_model_file(model_dir, self.config.default_model_filename, version)
        count = instances or self.config.instance_count
        self.runtimes = [OnnxRuntime(self.path, self.config) for _ in range(count)]
        for rt in self.runtimes:
            rt.load()
        first = self.runtimes[0]
        self.layout = TensorLayout.from_config(self.config, first.inputs, first.outputs)
        self.description = first.description

    @property
    def input_specs(self) -> list[TensorMetadata]:
        return [TensorMetadata(t.name, t.datatype, t.shape) for t in self.runtimes[0].inputs]

    def batches(
        self, requests: Sequence[Request], batch_size: int, bucketed: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """Requests stacked and padded exactly as the server's batcher does: consecutive
        ones, or (``bucketed``) only requests of one batching key (length bucket) together."""
        from taskserve.server.scheduling.collate import collate

        if not self.layout.batched and batch_size != 1:
            raise ValueError(f"model {self.config.name} has no batch dimension (max_batch_size 0): use batch size 1")
        pools: list[list[Request]] = [list(requests)]
        if bucketed:
            by_key: dict[object, list[Request]] = {}
            for r in requests:
                by_key.setdefault(self.layout.describe(r, None, self.config.max_batch_size or 1).key, []).append(r)
            pools = list(by_key.values())
        groups = []
        for pool in pools:
            n = len(pool)
            groups += [[pool[(i + j) % n] for j in range(batch_size)] for i in range(0, n, batch_size)]
        return [collate(g, self.layout).inputs for g in groups]

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()


def _measure(model: InProcessModel, batches: list[dict[str, np.ndarray]], rows: int, plan: WindowPlan) -> list[Window]:
    rec = _LockedRecorder(rows)
    stop = threading.Event()
    errors: list[BaseException] = []

    def instance_loop(index: int) -> None:
        runtime = model.runtimes[index]
        i = index
        while not stop.is_set():
            start = time.perf_counter()
            try:
                runtime.infer(batches[i % len(batches)])
            except Exception as err:  # noqa: BLE001 - a failed batch is a measurement, not a crash
                errors.append(err)
                rec.fail(type(err).__name__, time.perf_counter() - start)
            else:
                rec.ok(time.perf_counter() - start)
            i += len(model.runtimes)

    threads = [threading.Thread(target=instance_loop, args=(k,), daemon=True) for k in range(len(model.runtimes))]
    for t in threads:
        t.start()
    try:
        time.sleep(plan.warmup_s)
        rec.take()
        windows: list[Window] = []
        while len(windows) < plan.max_windows:
            time.sleep(plan.window_s)
            windows.append(rec.take())
            if is_stable(windows, plan.stable_windows, plan.tolerance):
                break
    finally:
        stop.set()
        for t in threads:
            t.join()
    if errors and not any(w.latencies_s for w in windows):
        raise RuntimeError(f"every in-process batch failed; first error: {errors[0]}")
    return windows


def run_in_process(
    model: InProcessModel,
    requests: Sequence[Request],
    batch_sizes: Sequence[int],
    plan: WindowPlan,
    *,
    progress: bool = True,
    bucketed: bool = False,
) -> list[RunResult]:
    """One result per batch size; ``load`` is the batch size, throughput counts items (rows).
    ``bucketed``: batches only within a length bucket, as the server forms them."""
    rows_per_request = int(next(iter(requests[0].values())).shape[0]) if model.layout.batched else 1
    label = BUCKETED_LABEL if bucketed else SERVER_LABEL
    results = []
    for size in tqdm(batch_sizes, disable=not progress, desc=f"{label} batch sizes", unit="size"):
        batches = model.batches(requests, size, bucketed)
        rows = size * rows_per_request
        windows = _measure(model, batches, rows, plan)
        measured, stable = choose_measured(windows, plan.stable_windows, plan.tolerance)
        results.append(RunResult(label, "in-process", size, rows, tuple(windows), measured, stable))
    return results


def best_batch(results: Sequence[RunResult]) -> RunResult:
    """The batch size with the highest item throughput."""
    return max(results, key=lambda r: r.items_per_s)
