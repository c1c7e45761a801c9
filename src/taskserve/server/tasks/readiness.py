"""READY means it can serve: the check a model version passes at load, before it
is marked READY. Its task must be one this server serves (a registered typed task,
or ``tensor`` for the v2 protocol only), its ``task_options`` must validate (the files
they name inside the model directory), and its task object (tokenizer, labels,
preprocessing) must build, which also warms it.

The model manager (serving/) and the tasks are sibling rooms that never import each
other; the front end wires ``check_options`` into it with ``ModelManager.add_config_check``
(before anything of a model loads) and ``check_servable`` with ``ModelManager.add_load_check`` (see
frontends/grpc/tasks/__init__.py), keeping front ends -> serving | tasks -> scheduling."""

from __future__ import annotations

from pathlib import Path

from taskserve.server.repository.config import ModelConfig
from taskserve.server.tasks.base import ServedModel, TaskCache, TaskConfigError
from taskserve.server.tasks.options import options_problems
from taskserve.server.tasks.registry import TASKS

# Served through the v2 protocol only: no typed task, nothing to build.
TENSOR_TASK = "tensor"


def check_options(model_dir: Path, config: ModelConfig) -> None:
    """Raise TaskConfigError when ``config.task_options`` are not ``config.task``'s options
    or name a file outside ``model_dir``: run before any of the model loads, so a file
    option is confined before anything opens it. A task without a row (``tensor``, or
    one this server does not serve) is not checked here (``check_servable`` refuses the
    latter)."""
    row = TASKS.get(config.task)
    if row is None:
        return
    problems = options_problems(config.task, row.options, dict(config.task_options), model_dir)
    if problems:
        raise TaskConfigError(f"model {config.name!r}: " + "; ".join(problems) + "; fix config.yaml")


async def check_servable(tasks: TaskCache, model: ServedModel) -> None:
    """Raise TaskConfigError with the reason when ``model`` cannot serve its task;
    otherwise its task object is built and cached for its first request."""
    task = model.config.task
    if task == TENSOR_TASK:
        return
    row = TASKS.get(task)
    if row is None:
        raise TaskConfigError(
            f"model {model.name!r}: task {task!r} is not served by this server (typed tasks: {sorted(TASKS)}); "
            f"set task: {TENSOR_TASK} to serve the model through the v2 protocol only"
        )
    problems = options_problems(task, row.options, dict(model.config.task_options), model.model_dir)
    if problems:
        raise TaskConfigError(f"model {model.name!r}: " + "; ".join(problems) + "; fix config.yaml")
    await tasks.get(model, row.cls)
