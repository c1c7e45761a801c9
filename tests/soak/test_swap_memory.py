"""Issue 19: memory stays bounded across unload/load cycles and reloads of a real model
(all-MiniLM-L6-v2) under typed callers. Bounded soak, run by ``make soak`` (and CI), not
by ``make test``: ~WARMUP + CYCLES cycles of a few seconds each.

Before the fix each cycle left the retired version's native ONNX Runtime sessions
resident (close dropped the Python wrapper, not the native handle, and a cancelled
batcher loop kept the runtimes in a cycle until a rare full collection): the issue saw
5,321 -> 6,611 MB from reload 5 to 20.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
from taskserve.server.runtimes.onnx import OnnxRuntime
from tests.support.server import ServerThread, running_server

pytestmark = pytest.mark.soak

MODEL = "all-MiniLM-L6-v2"
WARMUP = int(os.environ.get("TASKSERVE_SOAK_WARMUP", "5"))
CYCLES = int(os.environ.get("TASKSERVE_SOAK_CYCLES", "25"))
# A leaked MiniLM version is ~90 MB a session; allocator noise over a cycle is a few MB.
SLOPE_LIMIT_MB = 2.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def native_sessions() -> int:
    """Runtimes of MODEL still holding a native session, counted without a collection."""
    return sum(
        1
        for o in gc.get_objects()
        if type(o) is OnnxRuntime and o.config.name == MODEL and (o._native is not None or o._session is not None)
    )


@pytest.fixture(scope="module")
def minilm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    from taskserve.exporters.demo import build_demo

    repo = tmp_path_factory.mktemp("soak-repo")
    build_demo(repo, ["minilm"])
    with running_server(repo, model_control_mode="explicit") as server:
        yield server


async def _soak(server: ServerThread) -> dict[str, object]:
    stop = asyncio.Event()
    # Bumped when an unload starts and when the model is back: a call that saw no bump
    # ran entirely while the model was loaded (reloads included) and must succeed.
    epoch = 0
    ok = 0
    unexpected: list[str] = []
    samples: list[tuple[float, int]] = []
    request = se.EmbedRequest(model=common_pb2.ModelRef(name=MODEL), texts=["a swap loses nothing", "nor leaks"])
    async with grpc.aio.insecure_channel(server.address) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        embed = se_grpc.SentenceEmbeddingStub(channel)

        async def caller() -> None:
            nonlocal ok
            while not stop.is_set():
                started = epoch
                try:
                    await embed.Embed(request, timeout=60)
                    ok += 1
                except grpc.aio.AioRpcError as err:
                    if started == epoch and started % 2 == 0:  # an unloaded model refuses; a reloaded one must not
                        unexpected.append(f"{err.code().name}: {err.details()}")
                    else:
                        await asyncio.sleep(0.01)

        callers = [asyncio.create_task(caller()) for _ in range(2)]
        try:
            for _ in range(WARMUP + CYCLES):
                await v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=120)
                epoch += 1
                await v2.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL), timeout=120)
                await v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=MODEL), timeout=120)
                epoch += 1
                samples.append((rss_mb(), native_sessions()))
        finally:
            stop.set()
            await asyncio.gather(*callers)
    return {"ok": ok, "unexpected": unexpected, "samples": samples}


def test_reload_and_unload_load_cycles_keep_memory_flat(
    minilm_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    # pytest keeps every captured log record: the INFO lines of 90 loads would be a slope of their own.
    caplog.set_level(logging.WARNING)
    r = asyncio.run(_soak(minilm_server))
    samples: list[tuple[float, int]] = r["samples"]  # type: ignore[assignment]
    rss = np.array([s[0] for s in samples[WARMUP:]])
    slope = float(np.polyfit(np.arange(len(rss)), rss, 1)[0])
    print(
        f"soak: {WARMUP}+{CYCLES} cycles (reload, unload, load), {r['ok']} Embed calls OK; RSS after warm-up "
        f"{rss[0]:.0f} MiB, min {rss.min():.0f}, max {rss.max():.0f}, last {rss[-1]:.0f}, "
        f"slope {slope:+.2f} MiB/cycle; native sessions per cycle {sorted({s[1] for s in samples})}"
    )
    assert r["unexpected"] == []
    assert r["ok"] > 0
    assert minilm_server.app is not None
    instances = minilm_server.app.models.get(MODEL).config.instance_count
    assert {s[1] for s in samples} == {instances}  # every retired version's sessions were freed
    assert slope < SLOPE_LIMIT_MB
