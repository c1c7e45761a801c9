"""What every door (gRPC, HTTP) shares: the models, the task objects with their worker
pool and admission counter, the metrics, the settings and the readiness callable.

The ServingApp builds one ``ServingParts`` and hands it to each front end, so a request
is batched, limited and counted the same way whichever door it came through.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

from taskserve.server.metrics import ServerMetrics
from taskserve.server.serving.manager import ModelManager
from taskserve.server.settings import ServerSettings
from taskserve.server.tasks.base import TaskCache, TaskContext, TaskLimits
from taskserve.server.tasks.readiness import check_options, check_servable


@dataclass(frozen=True)
class ServingParts:
    """Shared by the front ends of one server; built once by the ServingApp, never copied."""

    settings: ServerSettings
    models: ModelManager
    # Task objects per model version, their worker pool and the typed-request admission counter.
    tasks: TaskCache
    metrics: ServerMetrics
    # True when the server takes traffic (startup loading finished, not draining).
    ready: Callable[[], bool]


def build_tasks(models: ModelManager, limits: TaskLimits | None = None, workers: int | None = None) -> TaskCache:
    """The task cache every door uses, wired into the manager: READY means it can serve,
    so each version's task is checked and built at load (tasks/readiness.py); the manager
    is below the tasks, so the front end wires it in. Call once per manager."""
    context = TaskContext(limits, workers or min(8, os.cpu_count() or 2), models=models.get)
    tasks = TaskCache(context)
    models.add_config_check(check_options)  # task options, and the files they name confined, first
    models.add_load_check(functools.partial(check_servable, tasks))
    models.add_retire_listener(tasks.forget)
    return tasks
