"""``task_options`` as typed models: the base every task's options model extends, the
``ModelFile`` type of options that name a file, and the load-time check.

Each task declares its own options model in its module (type, default and description
of every key it reads; ``tasks/registry.py`` pairs it with the config task and the task
class). A model loads only if its ``task_options`` validate: an unknown key (a typo) is
refused with the task's keys and the closest one, a wrong type with the key and the
type it takes, so a READY model never fails its first request on config.yaml.

An option that names a file is typed ``ModelFile``: loading confines it (and the file
read when it is unset) to the model directory through ``resolve_inside``, so no task
option can make the server open a file outside it. ``file_options`` finds them.
"""

from __future__ import annotations

import difflib
import enum
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator
from pydantic.fields import FieldInfo

from taskserve.server.repository.paths import OutsideModelDir, resolve_inside


@dataclass(frozen=True)
class InModelDir:
    """Marker of a ``ModelFile`` option: a path relative to the model directory that must
    stay inside it, symlinks included. ``unset``: the file the task reads when the option
    is unset and has no default of its own (e.g. ``chat_template.jinja``)."""

    unset: str | None = None


# A file in the model directory (its field's default is the file read when unset).
ModelFile = Annotated[str, InModelDir()]
# An enum option: its value as config.yaml spells it (lax: the strict models take only
# enum members, which YAML cannot write).
E = TypeVar("E", bound=enum.Enum)
Choice = Annotated[E, Strict(False)]


class TaskOptions(BaseModel):
    """The keys every task reads (``tasks/base.py``). Frozen; unknown keys and wrong
    types refused; ``null`` means unset (the default)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    activation: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="score function of a classifier: softmax, sigmoid or none (default: by task)"
    )
    id2label: dict[int | str, str] | None = Field(
        None, description="class names by index, when the entry has no labels file"
    )
    output: str | None = Field(
        None, description="the output the task reads (default: the task's usual name, else the only output)"
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


def _marker(field: FieldInfo) -> InModelDir | None:
    return next((m for m in field.metadata if isinstance(m, InModelDir)), None)


def file_options(model: type[TaskOptions]) -> dict[str, str | None]:
    """``model``'s options that name a file (``ModelFile``), each with the file the task
    reads when it is unset (None: nothing is read then)."""
    found: dict[str, str | None] = {}
    for key, field in model.model_fields.items():
        marker = _marker(field)
        if marker is not None:
            default = field.default if isinstance(field.default, str) else None
            found[key] = marker.unset or default
    return found


def _file_problems(model: type[TaskOptions], given: dict[str, Any], model_dir: Path) -> list[str]:
    """Each file option (set, or the file read when unset) that resolves outside
    ``model_dir``; the message names the option, never the path."""
    problems = []
    for key, default in file_options(model).items():
        value = given.get(key) if given.get(key) is not None else default
        if not isinstance(value, str):
            continue  # unset without a default, or a wrong type (reported by the model check)
        try:
            resolve_inside(model_dir, value, f"task_options.{key}")
        except OutsideModelDir:
            where = "" if given.get(key) is not None else f" (unset: its default {default!r})"
            problems.append(
                f"task_options.{key}{where} must name a file inside the model directory: a relative path "
                "that stays inside it, symlinks included"
            )
    return problems


def options_problems(
    task: str, model: type[TaskOptions], given: dict[str, Any], model_dir: Path | None = None
) -> list[str]:
    """What is wrong with ``given`` as ``task``'s options (empty: nothing), one line per key.
    With ``model_dir``, file options are also confined to it (``ModelFile``)."""
    problems = []
    try:
        model.model_validate(given)
    except ValidationError as err:
        files = file_options(model)
        reported: set[str] = set()
        for e in err.errors():
            key = str(e["loc"][0]) if e["loc"] else ""
            owner, path, field = _field_at(model, e["loc"])
            where = ".".join(path)
            if where in reported:
                continue  # a union reports once per member: one line per key is enough
            reported.add(where)
            if e["type"] == "extra_forbidden":
                name = path[-1] if path else key
                keys = sorted(owner.model_fields)
                close = difflib.get_close_matches(name, keys, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                of = f"task {task!r}" if owner is model else f"task_options.{'.'.join(path[:-1])}"
                problems.append(f"task_options.{where} is not an option of {of}{hint} (its options: {', '.join(keys)})")
            elif field is not None:
                got = "" if key in files else f", got {_short(e.get('input'))}"  # a file option's value is not repeated
                problems.append(f"task_options.{where} must be {field_type(field)}: {e['msg']}{got}")
            else:
                problems.append(f"task_options: {e['msg']}")
    if model_dir is not None:
        problems += _file_problems(model, given, model_dir)
    return problems


_FILE = "str (a file in the model directory)"


def _field_at(
    model: type[BaseModel], loc: tuple[int | str, ...]
) -> tuple[type[BaseModel], list[str], FieldInfo | None]:
    """The model owning the deepest named field on ``loc`` (options nest: ``image.size``),
    that field's path and the field; indexes and keys inside a field stay in the path, the
    inside of a union field (pydantic tags each member: ``int``, ``list[int]``) does not."""
    owner, path, field = model, [], None
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(part, str) and part in owner.model_fields:
            field = owner.model_fields[part]
            path.append(part)
            nested = model_in(field.annotation)
            if nested is not None and parts:
                owner = nested
        elif field is not None and _is_union(field.annotation):
            break  # a union's errors are the field's: one line for it, whichever member failed
        else:
            path.append(str(part))  # an index or a mapping key inside the field, or an unknown key
    return owner, path, field


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The options model ``annotation`` holds (``ImageSettings | None``), if any."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _is_union(annotation: Any) -> bool:
    if get_origin(annotation) not in (Union, types.UnionType):
        return False
    return len([a for a in get_args(annotation) if a is not type(None)]) > 1


def field_type(field: FieldInfo) -> str:
    """A field's type with its bounds: ``int >= 1``, ``list[str] (length >= 1)``."""
    signs = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    found = [f"{sign} {getattr(m, name)}" for m in field.metadata for name, sign in signs.items() if hasattr(m, name)]
    found += [f"length >= {m.min_length}" for m in field.metadata if hasattr(m, "min_length")]
    kind = _FILE if _marker(field) is not None else type_name(field.annotation)
    return " ".join([kind, *found]) if found else kind


def type_name(annotation: Any) -> str:
    """A field's type as config.yaml users read it: ``int``, ``list[str]``, ``'a' | 'b'``."""
    origin = get_origin(annotation)
    if origin is Annotated:
        inner, *extra = get_args(annotation)
        if any(isinstance(m, InModelDir) for m in extra):
            return _FILE
        return type_name(inner)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(annotation) if a is not type(None))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(m.value) for m in annotation)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(type_name(a) for a in get_args(annotation))}]"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
