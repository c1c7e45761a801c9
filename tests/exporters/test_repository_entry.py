"""Atomic entry writes: replace safely, keep other versions, leave nothing on failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taskserve.exporters import repository_entry
from taskserve.exporters.errors import ExportError
from taskserve.exporters.repository_entry import entry_complete, write_entry
from taskserve.server.repository.config import load_model_config

CONFIG = {
    "name": "m",
    "task": "tensor",
    "max_batch_size": 4,
    "inputs": [{"name": "x", "datatype": "FP32", "dims": [-1]}],
}


def _write(repo: Path, payload: bytes, version: int = 1, config: dict[str, object] | None = None) -> Path:
    model = repo.parent / f"payload-{payload.decode()}.onnx"
    model.write_bytes(payload)
    tokenizer = repo.parent / "tok.json"
    tokenizer.write_text("{}")
    return write_entry(
        repo,
        "m",
        version,
        config or CONFIG,
        {"model.onnx": model},
        {"tokenizer.json": tokenizer},
        {"source": "test"},
    )


def test_writes_a_complete_loadable_entry(tmp_path: Path) -> None:
    entry = _write(tmp_path / "repo", b"v1")
    assert entry_complete(entry)
    assert load_model_config(entry).inputs[0].dims == (-1,)  # type: ignore[index]
    assert "dims: [-1]" in (entry / "config.yaml").read_text()  # short lists stay on one line
    assert (entry / "1" / "model.onnx").read_bytes() == b"v1" and (entry / "tokenizer.json").is_file()


def test_replaces_an_entry_and_keeps_other_versions(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _write(repo, b"old1")
    _write(repo, b"old2", version=2)
    _write(repo, b"new1")
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"new1"
    assert (repo / "m" / "2" / "model.onnx").read_bytes() == b"old2"
    assert [p.name for p in repo.iterdir()] == ["m"]  # no temp or old directories left


def test_failure_while_writing_keeps_the_old_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _write(repo, b"old")

    def broken_copy(src: Path, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(repository_entry, "_copy", broken_copy)
    with pytest.raises(OSError, match="No space left"):
        _write(repo, b"new")
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in repo.iterdir()] == ["m"]


def test_failed_rename_puts_the_old_entry_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    _write(repo, b"old")
    real_rename = repository_entry.os.rename
    calls = []

    def rename(src: Path, dst: Path) -> None:
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:  # moving the new entry into place
            raise OSError("simulated crash")
        real_rename(src, dst)

    monkeypatch.setattr(repository_entry.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        _write(repo, b"new")
    assert (repo / "m" / "1" / "model.onnx").read_bytes() == b"old"
    assert [p.name for p in repo.iterdir()] == ["m"]


def test_invalid_generated_config_is_refused_before_writing(tmp_path: Path) -> None:
    bad = dict(CONFIG, max_batch_size=2, dynamic_batching={"preferred_batch_sizes": [8]})
    with pytest.raises(ExportError, match="preferred_batch_sizes"):
        _write(tmp_path / "repo", b"x", config=bad)
    assert not (tmp_path / "repo" / "m").exists()


def test_incomplete_entries_are_detected(tmp_path: Path) -> None:
    entry = _write(tmp_path / "repo", b"v1")
    (entry / "1" / "model.onnx").unlink()
    assert not entry_complete(entry)
    entry = _write(tmp_path / "repo", b"v1")
    (entry / "config.yaml").write_text(yaml.safe_dump({"task": "no-such-task"}))
    assert not entry_complete(entry)
