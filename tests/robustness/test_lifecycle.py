"""Issue 11, items 3, 4 and 7: per-model load/unload serialized (no leaked runtimes),
the ready gauge and metric series follow the model's life, and READY means it can serve."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.metrics import ServerMetrics
from taskserve.server.runtimes.onnx import OnnxRuntime
from taskserve.server.serving.manager import ModelManager
from tests.support.server import ServerThread


def live_sessions(model: str) -> int:
    """OnnxRuntime instances of ``model`` that still hold an InferenceSession. No
    gc.collect() first: a retired runtime must be closed, not left for a collection
    (the leaked ones sat in reference cycles until the next full collection, which a
    server with frozen startup objects runs rarely)."""
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, OnnxRuntime) and o._session is not None and o.config.name == model
    )


def ready_samples(server: ServerThread, model: str) -> list[str]:
    assert server.app is not None
    text = generate_latest(server.app.metrics.registry).decode()
    lines = text.splitlines()
    return [line for line in lines if line.startswith("taskserve_model_ready{") and f'model="{model}"' in line]


def series_lines(server: ServerThread, model: str) -> list[str]:
    assert server.app is not None
    text = generate_latest(server.app.metrics.registry).decode()
    return [line for line in text.splitlines() if not line.startswith("#") and f'model="{model}"' in line]


async def _unload_and_load_at_once(address: str, model: str, times: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(times):
            await asyncio.gather(
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=model)),
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model)),
                return_exceptions=True,
            )
        # Whatever the races left, end loaded.
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model))


def test_racing_unload_and_load_leak_no_runtime(robust_server: ServerThread) -> None:
    assert live_sessions("simple") == 1
    asyncio.run(_unload_and_load_at_once(robust_server.address, "simple", 10))
    # One instance serves; every runtime loaded on the way was closed.
    assert live_sessions("simple") == 1
    assert robust_server.app is not None and robust_server.app.models.is_ready("simple")


async def test_unload_then_load_at_once_in_the_manager_leaks_nothing(robust_repository: Path) -> None:
    # Unload first, so the Load waits for the model's lock while the Unload removes the
    # slot: before the per-name lock, that Load filled an orphan slot that held its
    # sessions (3 live after 10 rounds) and was never served or stopped.
    others = live_sessions("simple")  # the in-process server's, when it runs
    manager = ModelManager(robust_repository, ServerMetrics())
    await manager.load("simple")
    try:
        for _ in range(10):
            await asyncio.gather(manager.unload("simple"), manager.load("simple"), return_exceptions=True)
        assert manager.is_ready("simple")
        assert live_sessions("simple") == others + 1
    finally:
        await manager.stop()
    assert live_sessions("simple") == others


def test_ready_gauge_follows_reload_and_series_go_with_unload(
    robust_server: ServerThread, robust_channel: grpc.Channel
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(robust_channel)
    assert ready_samples(robust_server, "simple") == ['taskserve_model_ready{model="simple",version="1"} 1.0']
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))  # reload a serving model
    assert ready_samples(robust_server, "simple") == ['taskserve_model_ready{model="simple",version="1"} 1.0']
    assert live_sessions("simple") == 1  # the old version was freed
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="simple"))
    try:
        assert series_lines(robust_server, "simple") == []
        assert live_sessions("simple") == 0
    finally:
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="simple"))
    assert ready_samples(robust_server, "simple") == ['taskserve_model_ready{model="simple",version="1"} 1.0']


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("unknown-option", "task_options.top_kk is not an option of task 'text-classification'; did you mean 'top_k'?"),
        ("wrong-option-type", "task_options.top_k must be int >= 1: Input should be a valid integer, got 'three'"),
    ],
)
def test_a_model_that_cannot_serve_is_unavailable_with_the_reason(
    robust_server: ServerThread, robust_channel: grpc.Channel, model: str, reason: str
) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(robust_channel)
    index = {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
    assert index[model].state == "UNAVAILABLE"
    assert reason in index[model].reason
    assert not stub.ModelReady(pb.ModelReadyRequest(name=model)).ready
    assert live_sessions(model) == 0  # the runtime it loaded was closed again
    assert series_lines(robust_server, model) == []


async def test_a_task_without_a_registered_typed_task_is_refused(robust_server: ServerThread) -> None:
    # Every task the config schema names is served today, so the rule is shown on a
    # config that claims another: the registry (tasks.TASKS) decides, not a list.
    from taskserve.server.tasks.base import TaskCache, TaskConfigError, TaskContext
    from taskserve.server.tasks.readiness import check_servable

    assert robust_server.app is not None
    model = robust_server.app.models.get("simple")
    config = model.config.model_copy(update={"task": "audio-classification"})
    fake = type("Fake", (), {"name": "fake", "version": "1", "config": config, "model_dir": model.model_dir})()
    context = TaskContext(workers=1)
    try:
        with pytest.raises(TaskConfigError, match="task 'audio-classification' is not served by this server"):
            await check_servable(TaskCache(context), fake)
        await check_servable(TaskCache(context), model)  # task tensor: nothing to build
    finally:
        context.close()


def test_a_typed_task_is_built_at_load(robust_server: ServerThread) -> None:
    from taskserve.server.tasks import TextClassifier

    assert robust_server.app is not None
    model = robust_server.app.models.get("tiny-textcls")
    # The task cache already holds the model's task: its first request builds nothing.
    caches = [o for o in gc.get_objects() if type(o).__name__ == "TaskCache"]
    assert any(
        entry[0] is model and isinstance(entry[1], TextClassifier)
        for cache in caches
        for entry in cache._entries.values()
    )
