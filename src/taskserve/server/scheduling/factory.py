"""Builds the dynamic batcher of a model served in batches.

"No batching" is ``max_batch_size: 1`` (batches of one row) or ``0`` (no batch
dimension: each request runs alone, its inputs passed as-is), not a separate code
path. Entries with a ``generation:`` block (every text-generation and text2text-generation
model) run on the generation engine instead (scheduling/generation_scheduler.py); the model
manager picks which.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.scheduling.base import Scheduler
from taskserve.server.scheduling.batcher import DynamicBatcher
from taskserve.server.scheduling.layout import TensorLayout
from taskserve.server.scheduling.policy import BatchPolicy

log = logging.getLogger(__name__)


def _declared(runtime: Runtime, attribute: str) -> list[TensorInfo] | None:
    # A runtime that cannot describe itself (not loaded yet) leaves the config in charge.
    try:
        tensors: list[TensorInfo] = getattr(runtime, attribute)
    except Exception:  # noqa: BLE001
        return None
    return tensors or None


def create_scheduler(
    config: ModelConfig, runtimes: Sequence[Runtime], metrics: ModelMetrics | None = None
) -> Scheduler:
    """A scheduler owning ``runtimes`` (one per model instance, already loaded).

    Call ``await scheduler.start()`` on the serving event loop before submitting.
    """
    if not runtimes:
        raise ValueError(f"model {config.name!r}: create_scheduler needs at least one runtime")
    if len(runtimes) != config.instance_count:
        log.warning(
            "model %r: config asks for instance_count %d but %d runtimes were given; using %d",
            config.name, config.instance_count, len(runtimes), len(runtimes),
        )  # fmt: skip
    layout = TensorLayout.from_config(
        config, _declared(runtimes[0], "inputs"), _declared(runtimes[0], "outputs")
    )
    return DynamicBatcher(layout, BatchPolicy.from_config(config), runtimes, metrics)
