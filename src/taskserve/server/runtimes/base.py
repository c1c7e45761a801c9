"""The runtime interface: one loaded model instance that executes a batch.

A runtime knows nothing of gRPC, tasks or batching. Lifecycle:
``load`` -> ``warmup`` -> ``infer`` (many times) -> ``close``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorInfo:
    """What a runtime declares for one tensor. ``shape`` includes the batch
    dimension when the model batches; -1 marks a variable size."""

    name: str
    datatype: str  # v2 name: FP32, INT64, ...
    shape: tuple[int, ...]
    # Symbolic names of the axes (same length as shape; None: fixed or unnamed), when the
    # graph has them: inputs that share a name share that axis, so their sizes must match.
    axis_names: tuple[str | None, ...] = ()


class Runtime(abc.ABC):
    """One model instance. Not thread-safe: the caller runs at most one ``infer``
    at a time per instance (the batcher gives each instance its own thread)."""

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model; raises RuntimeFailure with the reason on failure."""

    @property
    @abc.abstractmethod
    def inputs(self) -> list[TensorInfo]: ...

    @property
    @abc.abstractmethod
    def outputs(self) -> list[TensorInfo]: ...

    @abc.abstractmethod
    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model on a full batch. ``output_names`` None means every output."""

    def infer_alone(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """``infer`` for a batch that starts while no other batch of this model computes
        or waits: a runtime that can use more of the machine then (a wider session) does."""
        return self.infer(inputs, output_names)

    def warmup(self, inputs: dict[str, np.ndarray]) -> None:
        """Execute once on representative inputs so the first request pays no setup cost."""
        self.infer(inputs)

    def close(self) -> None:  # noqa: B027 - optional hook; most runtimes free on garbage collection
        """Release the model's resources. Idempotent."""

    @property
    def description(self) -> str:
        """Human-readable summary (providers, device) for logs and metadata."""
        return type(self).__name__

    @property
    def on_gpu(self) -> bool:
        """Whether this loaded instance computes on a GPU (what v2 ModelConfig reports)."""
        return False
