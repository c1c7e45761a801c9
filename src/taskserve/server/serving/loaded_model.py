"""One servable model version, as the front ends and tasks see it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes import Runtime, TensorInfo
from taskserve.server.scheduling.base import Lifecycle, Scheduler
from taskserve.server.scheduling.engine_api import GenerationEngine
from taskserve.server.serving.leases import Leases


@dataclass
class LoadedModel:
    """One servable model version. ``config`` has inputs/outputs resolved against the graph.

    The server builds it in one place, ``factory.load_version``."""

    name: str
    version: str
    config: ModelConfig
    model_dir: Path
    # Exactly one of the two executes the model: the request batcher (single requests)
    # or the generation engine (sequences over a resident KV cache).
    scheduler: Scheduler | None
    metrics: ModelMetrics
    runtimes: list[Runtime]
    platform_description: str = ""
    # What a model without batcher runtimes (a torch decoder on the engine) declares.
    tensors: tuple[list[TensorInfo], list[TensorInfo]] | None = None
    engine: GenerationEngine | None = None
    # Requests that resolved this version and are not answered yet (leases.py): a swap
    # retires it only once they are done.
    leases: Leases = field(default_factory=Leases, repr=False, compare=False)

    @property
    def lifecycle(self) -> Lifecycle:
        """Whichever executes the model: started at load, stopped at unload."""
        executor = self.scheduler if self.scheduler is not None else self.engine
        assert executor is not None, "a loaded model has a scheduler or an engine"
        return executor

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.tensors[0] if self.tensors is not None else self.runtimes[0].inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.tensors[1] if self.tensors is not None else self.runtimes[0].outputs
