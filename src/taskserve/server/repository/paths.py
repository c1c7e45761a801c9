"""Confinement of the model repository: model names and every file a model's config names.

A model name is a single directory name (no separators, no ``.``/``..``), checked before the
filesystem is touched. Files named by a config (labels, tokenizer, chat template, ...) must
resolve, symlinks followed, inside the model's directory. Messages say where things are
relative to the repository: callers never see server paths.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from taskserve.server.errors import ConfigError, InvalidInput, LimitExceeded, quoted

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*")
# Longest model name (and version) a request may carry: a directory name longer than most
# file systems allow (NAME_MAX) can name no model (--max-name-chars).
MAX_NAME_CHARS = 255


class OutsideModelDir(ConfigError):
    """A config names a file that resolves outside its model's directory."""


def check_name_length(value: str, limit: int, what: str = "model name") -> None:
    """LimitExceeded when ``value`` (a model name or version from a request) is longer than
    ``limit``: checked before anything else, so no lookup, path or message pays for its length."""
    if len(value) > limit:
        raise LimitExceeded(
            f"{what} {quoted(value)} is over the limit of {limit} characters (--max-name-chars); "
            "name a model directory of the repository"
        )


def check_model_name(name: str) -> str:
    """``name`` if it is a plain model directory name; InvalidInput otherwise (never touches the disk)."""
    if not MODEL_NAME.fullmatch(name) or name in (".", ".."):
        raise InvalidInput(
            f"model name {quoted(name)} is not valid: use letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (a directory directly inside the model repository)"
        )
    return name


def model_dir_inside(repository: Path, name: str) -> Path:
    """The directory of model ``name``, which must resolve inside ``repository`` (a symlinked
    model directory pointing elsewhere is refused as not found)."""
    check_model_name(name)
    root = repository.resolve()
    candidate = (repository / name).resolve()
    if candidate.parent != root:
        raise OutsideModelDir(f"{name}: the model directory resolves outside the model repository")
    return repository / name


def resolve_inside(model_dir: Path, relative: str, what: str = "file") -> Path:
    """``model_dir / relative`` with symlinks resolved, refused unless it stays inside ``model_dir``.

    ``what`` names the config field in the message, e.g. "labels". The returned path need not
    exist; callers check that and report it with ``shown``.
    """
    # The value is never repeated: it may be a server path, or lead to one through a symlink.
    if not relative or PurePosixPath(relative).is_absolute() or Path(relative).is_absolute():
        raise OutsideModelDir(f"{model_dir.name}: {what} must be a path relative to the model directory")
    root = model_dir.resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise OutsideModelDir(
            f"{model_dir.name}: {what} resolves outside the model directory; "
            "keep the file inside it (symlinks included)"
        )
    return target


def shown(path: Path, model_dir: Path) -> str:
    """``path`` as callers may see it: ``<model>/<relative path>``, never an absolute server path."""
    for base in (model_dir, model_dir.resolve()):
        try:
            return str(PurePosixPath(model_dir.name) / path.relative_to(base).as_posix())
        except ValueError:
            continue
    return f"{model_dir.name}/{path.name}"


def model_dir_names(repository: Path) -> list[str]:
    """Names of the directories directly in ``repository`` that are valid model names and
    resolve inside it; anything else (hidden folders, odd names, symlinks out) is skipped."""
    root = repository.resolve()
    names = []
    for p in repository.iterdir():
        if p.is_dir() and MODEL_NAME.fullmatch(p.name) and p.resolve().parent == root:
            names.append(p.name)
    return sorted(names)


def without_server_paths(message: str, repository: Path) -> str:
    """``message`` with the repository's absolute location cut off, so that a path inside
    it reads ``<model>/<file>``: for reasons that reach callers (load failures, index)."""
    for base in {str(repository.resolve()), str(repository.absolute()), str(repository)}:
        if base not in (".", ""):
            message = message.replace(base.rstrip("/") + "/", "")
    return message
