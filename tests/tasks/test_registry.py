"""One registry row per task (tasks/registry.py) and one front-end row per task with typed
services (frontends/grpc/tasks/__init__.py), keyed by the same config.yaml task names."""

from __future__ import annotations

from typing import get_args

import pytest

from taskserve.server.frontends.grpc.tasks import SERVICES, services
from taskserve.server.repository.config import Task as ConfigTask
from taskserve.server.tasks.registry import ROWS, TASKS, TaskRow
from taskserve.server.tasks.text_classification import TextClassificationOptions, TextClassifier
from taskserve.server.tasks.token_classification import TokenClassifier


def test_every_registered_task_is_a_config_task_with_its_services() -> None:
    assert len(TASKS) == len(ROWS)
    assert set(TASKS) == set(get_args(ConfigTask)) - {"tensor"}
    assert set(SERVICES) == set(TASKS)
    assert all(SERVICES[task] for task in TASKS)
    # Every servicer registered once, however many tasks it serves.
    names = [service.full_name for service in services()]
    assert len(names) == len(set(names)) == 15


def test_a_row_that_disagrees_with_its_class_is_refused() -> None:
    with pytest.raises(TypeError, match="TokenClassifier"):
        TaskRow("token-classification", TokenClassifier, TextClassificationOptions)
    with pytest.raises(TypeError, match="serves 'text-classification'"):
        TaskRow("fill-mask", TextClassifier, TextClassificationOptions)
