"""Waiting for a benchmarked server's model: ready, or failed with the server's reason
at once rather than after the whole startup timeout."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskserve.benchmarks.peer_servers import load_failure, spawn_taskserve
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from tests.support.tiny_models import add_sub_graph, write_entry


def _entry(name: str, state: str, reason: str = "") -> pb.RepositoryIndexResponse.ModelIndex:
    return pb.RepositoryIndexResponse.ModelIndex(name=name, version="1", state=state, reason=reason)


def test_only_an_unavailable_model_with_a_reason_has_failed() -> None:
    failed = _entry("m", "UNAVAILABLE", "onnxruntime could not load m/1/model.onnx")
    assert load_failure([_entry("other", "READY"), failed], "m") == "onnxruntime could not load m/1/model.onnx"
    # Still on its way: listed before its load starts, loading, or ready.
    assert load_failure([_entry("m", "UNAVAILABLE", "unloaded")], "m") is None
    assert load_failure([_entry("m", "LOADING")], "m") is None
    assert load_failure([_entry("m", "READY")], "m") is None
    assert load_failure([_entry("m", "UNAVAILABLE")], "m") is None
    # Another model's failure is not this one's.
    assert load_failure([_entry("other", "UNAVAILABLE", "broken")], "m") is None
    assert load_failure([], "m") is None


def test_wait_ready_returns_for_a_loaded_model_and_fails_with_the_reason_for_a_broken_one(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    (repo / "broken" / "config.yaml").write_text("max_batch_size: 4\n")
    server = spawn_taskserve(repo, tmp_path)
    try:
        server.wait_ready("simple", timeout=120)
        # A TimeoutError after 120 s would be the old behaviour: the server keeps running,
        # the broken model is never ready.
        with pytest.raises(RuntimeError, match="failed to load broken: onnxruntime could not load broken/1/model.onnx"):
            server.wait_ready("broken", timeout=120)
    finally:
        server.stop()
