"""Which numbered version directories of a model to serve."""

from __future__ import annotations

from pathlib import Path

from taskserve.server.repository.config import VersionPolicy


def available_versions(model_dir: Path) -> list[int]:
    """Integer-named subdirectories, ascending."""
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def select_versions(available: list[int], policy: VersionPolicy) -> list[int]:
    """Versions the policy serves, ascending; the last one is the default."""
    if policy.all:
        return list(available)
    if policy.specific:
        return [v for v in available if v in set(policy.specific)]
    count = policy.latest or 1
    return available[-count:]
