"""A controllable fake runtime and a manual clock for batcher tests."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from taskserve.server.runtimes.base import Runtime, TensorInfo


def masked_outputs(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model whose results depend on padding being masked out correctly.

    ``ids`` [B, S] int64 and ``mask`` [B, S] int64 ->
    ``hidden`` [B, S, 2] float32 (per token), ``pooled`` [B] float32 (masked mean),
    ``length`` [B] int64 (tokens the mask counts).
    """
    ids = inputs["ids"].astype(np.float32)
    mask = inputs["mask"].astype(np.float32)
    hidden = np.stack([ids * mask, ids * 0.5 + 1.0], axis=-1).astype(np.float32)
    pooled = (ids * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)
    return {
        "hidden": hidden,
        "pooled": pooled.astype(np.float32),
        "length": mask.sum(axis=1).astype(np.int64),
    }


class FakeRuntime(Runtime):
    """Records every batch it sees; can block on a gate and fail on demand.

    ``infer`` runs on the batcher's executor thread; the recording is guarded by a lock.
    """

    def __init__(
        self,
        compute: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = masked_outputs,
        gate: threading.Event | None = None,
        fail: Callable[[dict[str, np.ndarray]], bool] | None = None,
        barrier: threading.Barrier | None = None,
    ) -> None:
        self.compute = compute
        self.gate = gate
        self.fail = fail
        self.barrier = barrier
        self.lock = threading.Lock()
        self.batches: list[dict[str, np.ndarray]] = []
        self.output_requests: list[list[str] | None] = []
        self.threads: set[int] = set()
        self.started = threading.Semaphore(0)  # released once per infer call as it begins
        self.active = 0
        self.max_active = 0
        self.closed = False

    def load(self) -> None:
        pass

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo("ids", "INT64", (-1, -1)), TensorInfo("mask", "INT64", (-1, -1))]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [
            TensorInfo("hidden", "FP32", (-1, -1, 2)),
            TensorInfo("pooled", "FP32", (-1,)),
            TensorInfo("length", "INT64", (-1,)),
        ]

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        with self.lock:
            self.batches.append({k: v.copy() for k, v in inputs.items()})
            self.output_requests.append(output_names)
            self.threads.add(threading.get_ident())
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.started.release()
        try:
            if self.barrier is not None:
                self.barrier.wait()
            if self.gate is not None and not self.gate.wait(timeout=30):
                raise RuntimeError("fake runtime gate was never opened")
            if self.fail is not None and self.fail(inputs):
                raise ValueError("fake runtime failure")
            outputs = self.compute(inputs)
        finally:
            with self.lock:
                self.active -= 1
        if output_names is not None:
            outputs = {k: v for k, v in outputs.items() if k in output_names}
        return outputs

    def close(self) -> None:
        self.closed = True

    def saw(self, predicate: Callable[[dict[str, np.ndarray]], bool]) -> bool:
        with self.lock:
            return any(predicate(b) for b in self.batches)


class ManualClock:
    """A monotonic clock the test moves by hand (read from executor threads too)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
