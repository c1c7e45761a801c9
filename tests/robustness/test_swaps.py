"""Issue 19, "swaps lose nothing and leak nothing": reloads of a model under typed and
v2 callers fail no request, and a retired version leaves no runtime, session or task
behind, counted without a garbage collection (the long RSS version is tests/soak)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import grpc
import numpy as np
import pytest

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2 as tc
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2_grpc as tc_grpc
from taskserve.server.errors import ModelNotReady
from taskserve.server.metrics import ServerMetrics
from taskserve.server.runtimes.onnx import OnnxRuntime
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.serving.manager import ModelManager
from tests.support.server import ServerThread
from tests.support.waiting import until

from .conftest import TEXTCLS
from .v2 import infer_request

RELOADS = 40
CYCLES = 10


def runtimes(model: str) -> tuple[int, int]:
    """(OnnxRuntime objects of ``model`` alive, those still holding an ONNX Runtime
    session), without a collection first: a retired version must be freed when it
    retires, not when the next full collection finds it in a cycle."""
    found = [o for o in gc.get_objects() if type(o) is OnnxRuntime and o.config.name == model]
    return len(found), sum(1 for o in found if o._session is not None or o._native is not None)


def loaded_versions(model: str) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is LoadedModel and o.name == model)


async def _reloads_under_callers(address: str) -> tuple[list[grpc.StatusCode], list[str]]:
    stop = asyncio.Event()
    codes: list[grpc.StatusCode] = []
    details: list[str] = []
    ids = np.array([[2, 7, 8, 9, 3]], np.int64)
    v2_request = infer_request(TEXTCLS, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=0 * ids)
    typed_request = tc.ClassifyTextRequest(
        model=common_pb2.ModelRef(name=TEXTCLS), texts=["the cat sat on the mat " * 4, "a dog"]
    )
    async with grpc.aio.insecure_channel(address) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        typed = tc_grpc.TextClassificationStub(channel)

        async def caller(call: object, request: object) -> None:
            while not stop.is_set():
                try:
                    await call(request, timeout=30)  # type: ignore[operator]
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as err:
                    codes.append(err.code())
                    details.append(err.details() or "")

        callers = [asyncio.create_task(caller(typed.Classify, typed_request)) for _ in range(8)]
        callers += [asyncio.create_task(caller(v2.ModelInfer, v2_request)) for _ in range(4)]
        try:
            for _ in range(RELOADS):
                await v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=TEXTCLS), timeout=60)
        finally:
            stop.set()
            await asyncio.gather(*callers)
    return codes, details


def test_reloads_under_typed_and_v2_callers_fail_nothing_and_free_the_old(robust_server: ServerThread) -> None:
    # Before leases: a typed request that resolved the old version, then tokenized on the
    # worker pool while the swap stopped it, failed with UNAVAILABLE "shutting down".
    gc.collect()  # earlier tests' garbage (failed requests' tracebacks hold models); none after
    codes, details = asyncio.run(_reloads_under_callers(robust_server.address))
    failed = [c for c in codes if c != grpc.StatusCode.OK]
    print(f"swaps: {RELOADS} reloads, {len(codes)} requests, {len(failed)} failed {sorted(set(details))[:3]}")
    assert failed == [], sorted(set(details))
    assert len(codes) > 10 * RELOADS
    assert robust_server.app is not None
    model = robust_server.app.models.get(TEXTCLS)
    assert model.leases.held == 0
    # Only the serving version is left: its runtime, its one LoadedModel.
    assert runtimes(TEXTCLS) == (model.config.instance_count,) * 2
    assert loaded_versions(TEXTCLS) == 1


async def _cycles(server: ServerThread, times: int) -> list[tuple[int, int, int]]:
    counts = []
    async with grpc.aio.insecure_channel(server.address) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        typed = tc_grpc.TextClassificationStub(channel)
        request = tc.ClassifyTextRequest(model=common_pb2.ModelRef(name=TEXTCLS), texts=["warm the task"])
        for _ in range(times):
            await v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=TEXTCLS), timeout=60)
            await v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=TEXTCLS), timeout=60)
            await typed.Classify(request, timeout=30)  # the task is built and used
            counts.append((*runtimes(TEXTCLS), loaded_versions(TEXTCLS)))
    return counts


def test_unload_load_cycles_leave_one_runtime_and_one_task(robust_server: ServerThread) -> None:
    # Before: each retired batcher's loop was cancelled, and the CancelledError's traceback
    # kept the batcher and its runtimes (whose native session ``close`` left open) in a
    # cycle until a full collection, one more per cycle.
    assert robust_server.app is not None
    gc.collect()  # earlier tests' garbage; the cycles themselves are counted without one
    counts = asyncio.run(_cycles(robust_server, CYCLES))
    instances = robust_server.app.models.get(TEXTCLS).config.instance_count
    assert counts == [(instances, instances, 1)] * CYCLES
    caches = [o for o in gc.get_objects() if type(o).__name__ == "TaskCache"]
    model = robust_server.app.models.get(TEXTCLS)
    holders = [e[0] for c in caches for e in c._entries.values() if e[0].name == TEXTCLS]
    assert len(holders) == 1 and holders[0] is model  # the serving version's task only


async def test_a_swapped_out_version_serves_its_leases_then_stops(robust_repository: Path) -> None:
    manager = ModelManager(robust_repository, ServerMetrics())
    await manager.load("simple")
    x = np.arange(4, dtype=np.float32)[None]
    request = InferRequest(inputs={"INPUT0": x, "INPUT1": x})
    try:
        old = manager.get("simple")
        old.leases.take()  # a request that resolved the version and has not submitted yet
        reload = asyncio.create_task(manager.load("simple"))
        await until(lambda: manager.get("simple") is not old, "the new version to serve")
        # The old one still serves the request it accepted; the reload waits for it.
        assert (await old.scheduler.submit(request)).outputs
        # The reload is blocked on the lease, not merely not finished yet.
        await until(lambda: old.leases.awaited, "the reload to wait for the old version's lease")
        assert not reload.done()
        old.leases.give_back()
        await asyncio.wait_for(reload, 30)
        with pytest.raises(ModelNotReady, match="shutting down"):
            await old.scheduler.submit(request)
    finally:
        await manager.stop()


async def test_a_lease_held_past_the_swap_grace_does_not_block_the_swap(robust_repository: Path) -> None:
    others = runtimes("simple")[1]  # the in-process server's, when it runs
    manager = ModelManager(robust_repository, ServerMetrics(), retire_grace_s=0.05)
    await manager.load("simple")
    try:
        old = manager.get("simple")
        old.leases.take()  # never given back (a stuck client)
        await asyncio.wait_for(manager.load("simple"), 30)
        assert manager.get("simple") is not old
        assert runtimes("simple")[1] == others + manager.get("simple").config.instance_count
    finally:
        await manager.stop()


def test_swap_grace_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from taskserve.server.main import parse_args

    assert parse_args(["--model-repository", str(tmp_path)]).swap_grace_s == 30.0
    assert parse_args(["--model-repository", str(tmp_path), "--swap-grace", "5"]).swap_grace_s == 5.0
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), "--swap-grace", "-1"])
    assert "--swap-grace must be >= 0" in capsys.readouterr().err
