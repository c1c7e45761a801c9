"""The scheduler interface between the front ends and the runtimes.

A scheduler owns a model's queue and its runtime instances. Front ends and
tasks hand it ``InferRequest``s and await ``InferResult``s; they never touch a
runtime directly. It knows nothing of gRPC or of tasks.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


# InferRequest and InferResult are made for every request: plain slotted dataclasses,
# a quarter of the cost of frozen ones. Treat them as immutable all the same.
@dataclass(slots=True)
class InferRequest:
    """One caller's tensors. When the model batches (max_batch_size > 0) every
    input has a leading batch dimension of the same size (one or more rows)."""

    inputs: Mapping[str, np.ndarray]
    # Outputs the caller wants (None: all). The runtime may compute more.
    output_names: tuple[str, ...] | None = None
    # 1 is the highest; None takes the model's default.
    priority: int | None = None
    # Absolute time.monotonic() after which the request must not be computed.
    deadline: float | None = None


@dataclass(slots=True)
class InferResult:
    outputs: dict[str, np.ndarray]
    # Time spent waiting in the queue and executing, in nanoseconds.
    queue_ns: int = 0
    compute_ns: int = 0
    # Rows in the batch this request was computed in.
    batch_size: int = 1


class Lifecycle(abc.ABC):
    """What the model manager (serving/manager.py) drives for every loaded model version,
    whichever way it executes (the request batcher ``Scheduler`` or the
    ``GenerationEngine``): start it, count its work, stop it. Called on the event loop."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the background loops. Called once, on the event loop."""

    @abc.abstractmethod
    def inflight_count(self) -> int:
        """Requests (or sequences) queued or executing."""

    @abc.abstractmethod
    async def stop(self, drain: bool = True) -> None:
        """Refuse new work; with ``drain`` finish the queued work first. Idempotent."""


class Scheduler(Lifecycle):
    """Owns one model version's queue and runtime instances.

    ``submit`` is called from the event loop; it is safe to call concurrently.
    Cancelling the awaiting task removes the request from the queue.
    """

    @abc.abstractmethod
    async def submit(self, request: InferRequest) -> InferResult:
        """Queue a request and wait for its result.

        Raises Overloaded when the queue is full, DeadlineExceeded when the
        deadline passes before compute starts, InvalidInput for tensors that
        cannot be batched, ModelNotReady once stopping, RuntimeFailure when
        the runtime fails.
        """
