"""READY means it can serve: the check a model version passes at load, before it
is marked READY. Its task must be one this server serves (a registered typed task,
or ``tensor`` for the v2 protocol only), its ``task_options`` must validate (files they name
inside the model directory), and its
task object (tokenizer, labels, preprocessing) must build, which also warms it.

The model manager sits below the tasks and cannot import them; the front end wires
``check_servable`` into it with ``ModelManager.add_load_check`` (see
frontends/grpc/tasks/__init__.py), keeping front ends -> tasks -> scheduling."""

from __future__ import annotations

from taskserve.server.tasks import TASKS
from taskserve.server.tasks.base import ServedModel, TaskCache, TaskConfigError
from taskserve.server.tasks.options import options_problems

# Served through the v2 protocol only: no typed task, nothing to build.
TENSOR_TASK = "tensor"


async def check_servable(tasks: TaskCache, model: ServedModel) -> None:
    """Raise TaskConfigError with the reason when ``model`` cannot serve its task;
    otherwise its task object is built and cached for its first request."""
    task = model.config.task
    if task == TENSOR_TASK:
        return
    cls = TASKS.get(task)
    if cls is None:
        raise TaskConfigError(
            f"model {model.name!r}: task {task!r} is not served by this server (typed tasks: {sorted(TASKS)}); "
            f"set task: {TENSOR_TASK} to serve the model through the v2 protocol only"
        )
    problems = options_problems(task, dict(model.config.task_options), model.model_dir)
    if problems:
        raise TaskConfigError(f"model {model.name!r}: " + "; ".join(problems) + "; fix config.yaml")
    await tasks.get(model, cls)
