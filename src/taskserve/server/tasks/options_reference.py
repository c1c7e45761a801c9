"""docs/task-options.md, written from the options models of the registry, so the docs'
option lists cannot drift from what the server accepts (a test compares them).

Regenerate: ``python -m taskserve.server.tasks.options_reference > docs/task-options.md``."""

from __future__ import annotations

import enum
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from taskserve.server.tasks.options import TaskOptions, field_type, file_options, model_in
from taskserve.server.tasks.registry import ROWS

_HEAD = """# Task options (`task_options` in config.yaml)

Generated from the options models (`src/taskserve/server/tasks/`, one per task, paired with
its task in `tasks/registry.py`) by `python -m taskserve.server.tasks.options_reference >
docs/task-options.md`; `tests/tasks/test_task_options.py` fails when this file is stale.

Every model's `task_options` are checked when it loads, before anything of it runs: an
unknown key (a typo) leaves the model UNAVAILABLE with the task's keys and the closest one
(`task_options.top_kk is not an option of task 'text-classification'; did you mean
'top_k'?`), a wrong type or a value out of range with the key and the type it takes
(`task_options.top_k must be int >= 1: ...`). `null` means unset (the default). Options that
name a file (type "str (a file in the model directory)") must stay inside the model
directory, symlinks included. Models of task `tensor` (v2 only) are not checked.
"""


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`" if not isinstance(value, str) else f"`{value}`"


def _table(model: type[BaseModel]) -> list[str]:
    files = file_options(model) if issubclass(model, TaskOptions) else {}
    lines = ["| option | type | default | what it sets |", "|---|---|---|---|"]
    for key, field in sorted(model.model_fields.items()):
        default = _default(field)
        if files.get(key) and default == "unset":
            default = f"unset (reads `{files[key]}`)"
        kind = field_type(field).replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {field.description or ''} |")
    return lines


def render() -> str:
    """The whole of docs/task-options.md."""
    out = [_HEAD]
    # Option models inside options (``image``): the key(s) they sit under and their tasks.
    nested: dict[type[BaseModel], tuple[set[str], list[str]]] = {}
    for row in ROWS:
        out.append(f"\n## `{row.task}` ({row.cls.__name__}, {row.options.__name__})\n")
        out += _table(row.options)
        for key, field in row.options.model_fields.items():
            inner = model_in(field.annotation)
            if inner is not None:
                keys, tasks = nested.setdefault(inner, (set(), []))
                keys.add(key)
                tasks.append(row.task)
    for inner, (keys, tasks) in nested.items():
        out.append(f"\n## `{'`, `'.join(sorted(keys))}` ({inner.__name__}): {', '.join(tasks)}\n")
        out += _table(inner)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
