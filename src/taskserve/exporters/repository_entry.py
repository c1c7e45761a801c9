"""Write a model repository entry atomically: build it in a hidden temp dir next to the
target, then rename it into place. A failure at any point leaves the old entry (or
nothing) behind; the server skips dot-directories, so it never sees a half-written one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from taskserve.exporters.errors import ExportError, UsageError
from taskserve.server.errors import ConfigError
from taskserve.server.repository.config import load_model_config, parse_model_config

INFO_FILE = "export-info.json"


class _Dumper(yaml.SafeDumper):
    """Short lists of numbers/strings (dims, mean, std) on one line: ``dims: [-1, 384]``."""


def _represent_list(dumper: _Dumper, data: Any) -> yaml.Node:
    flow = len(data) <= 8 and all(isinstance(x, (int, float, str)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_Dumper.add_representer(list, _represent_list)
_Dumper.add_representer(tuple, _represent_list)


def dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.dump(dict(data), Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def check_writable(repo: Path) -> None:
    """Fail early, before any export work, when entries cannot be written under ``repo``."""
    if repo.exists() and not repo.is_dir():
        raise UsageError(f"output path {repo} exists and is not a directory")
    try:
        repo.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output directory {repo}: {err.strerror or err}") from None
    if not os.access(repo, os.W_OK | os.X_OK):
        raise UsageError(f"output directory {repo} is not writable")


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def write_entry(
    repo: Path,
    name: str,
    version: int,
    config: Mapping[str, Any],
    version_files: Mapping[str, Path],
    model_files: Mapping[str, Path],
    info: Mapping[str, Any],
) -> Path:
    """Create or replace ``repo/name`` with config.yaml, ``version/<files>`` and the model-dir files.

    Other numbered versions of an existing entry are carried over. Returns the entry path.
    """
    try:
        parse_model_config(dict(config), Path(name) / "config.yaml", name)
    except ConfigError as err:
        raise ExportError(f"the generated configuration is invalid (exporter bug): {err}") from None
    check_writable(repo)
    target = repo / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo))
    try:
        if target.is_dir():
            for old in target.iterdir():
                if old.is_dir() and old.name.isdigit() and old.name != str(version):
                    _copy(old, tmp / old.name)
        for rel, src in version_files.items():
            _copy(src, tmp / str(version) / rel)
        for rel, src in model_files.items():
            _copy(src, tmp / rel)
        (tmp / "config.yaml").write_text(dump_yaml(config))
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the server may run as another user
        _swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _swap_into_place(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)  # put the previous entry back
        raise
    shutil.rmtree(old, ignore_errors=True)


def read_info(entry: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((entry / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def entry_complete(entry: Path) -> bool:
    """A written entry: config.yaml valid, its model file and listed files present."""
    try:
        config = load_model_config(entry)
    except ConfigError:
        return False
    if not (entry / "config.yaml").is_file() or read_info(entry) is None:
        return False
    versions = sorted(
        (p for p in entry.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )
    if not versions or not (versions[-1] / config.default_model_filename).is_file():
        return False
    return config.labels is None or (entry / config.labels).is_file()
