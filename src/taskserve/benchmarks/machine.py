"""What a result was measured on: CPU, cores, memory, Python, package versions, git commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = (
    "taskserve", "grpcio", "protobuf", "numpy", "onnxruntime", "onnx", "tokenizers", "uvloop", "tritonclient",
)  # fmt: skip
REPO_ROOT = Path(__file__).resolve().parents[3]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# Results are what a run writes, not what it measures: a tree whose only changes are
# results (an earlier step of ``make bench``) is still the commit it names.
_NOT_SOURCE = ":(exclude)benchmarks/results"


def tree_state() -> tuple[str | None, bool | None]:
    """The checkout's commit, and whether anything but results differs from it (tracked
    changes and untracked files git does not ignore); None where git cannot tell."""
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=normal", "--", ".", _NOT_SOURCE)
    return commit, (bool(dirty) if dirty is not None else None)


class DirtyTree(Exception):
    """Results would not be reproducible from the commit they name."""


def require_clean_tree(allow_dirty: bool) -> None:
    """Refuse to measure on a tree that differs from its commit, unless ``allow_dirty``
    (the results are then marked dirty)."""
    commit, dirty = tree_state()
    if allow_dirty:
        return
    if commit is None or dirty is None:
        raise DirtyTree("cannot tell which commit this is (no git checkout?): pass --allow-dirty to measure anyway")
    if dirty:
        raise DirtyTree(
            f"the working tree differs from commit {commit[:12]}: commit first so the results name what they "
            "measured, or pass --allow-dirty (the results are then marked dirty)"
        )


def machine_info() -> dict[str, object]:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    commit, dirty = tree_state()
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
