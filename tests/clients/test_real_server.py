"""The clients against the real taskserve server, serving tiny ONNX models built with onnx.helper."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from taskserve.clients import AsyncTaskServeClient, InvalidArgument, NotFound, TaskServeClient
from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("repo")
    write_entry(
        repo,
        "simple",
        add_sub_graph(),
        {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 200}},
    )
    write_entry(repo, "strings", identity_graph(TensorProto.STRING, ["batch", 2]), {"max_batch_size": 4})
    with running_server(Path(repo)) as srv:
        yield srv


def test_sync_client_against_the_server(server: ServerThread) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.ones((2, 4), dtype=np.float32)
    with TaskServeClient(server.address) as client:
        client.wait_until_ready("simple", timeout=30)
        assert client.server_live() and client.server_ready()
        meta = client.model_metadata("simple")
        assert [t.name for t in meta.inputs] == ["INPUT0", "INPUT1"]
        assert meta.input("INPUT0").datatype == "FP32"
        out = client.infer("simple", {"INPUT0": a, "INPUT1": b}, priority=1)
        np.testing.assert_allclose(out["OUTPUT0"], a + b)
        np.testing.assert_allclose(out["OUTPUT1"], a - b)
        only = client.infer("simple", {"INPUT0": a, "INPUT1": b}, outputs=["OUTPUT1"])
        assert list(only) == ["OUTPUT1"]
        words = np.array([[b"hello", b"world"]], dtype=np.object_)
        assert client.infer("strings", {"INPUT0": words})["OUTPUT0"].tolist() == [[b"hello", b"world"]]
        with pytest.raises(NotFound):
            client.infer("missing", {"INPUT0": a})
        with pytest.raises(InvalidArgument):
            client.infer("simple", {"INPUT0": a.astype(np.float64), "INPUT1": b})


async def test_async_client_concurrent_requests(server: ServerThread) -> None:
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((1, 4)).astype(np.float32) for _ in range(16)]
    async with AsyncTaskServeClient(server.address) as client:
        outs = await asyncio.gather(*(client.infer("simple", {"INPUT0": x, "INPUT1": x}) for x in batches))
    for x, out in zip(batches, outs, strict=True):
        np.testing.assert_allclose(out["OUTPUT0"], 2 * x, rtol=1e-6)
        np.testing.assert_allclose(out["OUTPUT1"], np.zeros_like(x))
