"""The asyncio client against the in-test server (which runs on its own loop thread)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from taskserve.clients import (
    AsyncTaskServeClient,
    ClientOptions,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from tests.clients.client_fakes import Recorder, ServerThread

# Async fixtures live on the session loop (pyproject), so the tests must run there too.
pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture()
async def client(fake_server: ServerThread) -> AsyncIterator[AsyncTaskServeClient]:
    async with AsyncTaskServeClient(fake_server.target) as c:
        yield c


async def test_infer_round_trip(client: AsyncTaskServeClient, rec: Recorder) -> None:
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = await client.infer("echo", {"x": x, "s": np.array(["a", "bc"])}, priority=1)
    np.testing.assert_array_equal(out["OUT_x"], x)
    assert out["OUT_s"].tolist() == [b"a", b"bc"]
    assert rec.requests[-1].parameters["priority"].uint64_param == 1


async def test_health_metadata_and_errors(client: AsyncTaskServeClient) -> None:
    assert await client.server_live()
    assert await client.server_ready()
    assert await client.model_ready("typed-echo")
    assert (await client.server_metadata()).version == "0.0.1"
    assert (await client.model_metadata("echo")).versions == ("1",)
    with pytest.raises(NotFound) as info:
        await client.model_metadata("missing")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InvalidArgument, match="failed on purpose"):
        await client.infer("fail-INVALID_ARGUMENT", {"x": np.zeros(1, np.float32)})


async def test_deadline_and_retries(fake_server: ServerThread, rec: Recorder) -> None:
    async with AsyncTaskServeClient(fake_server.target, ClientOptions(timeout_s=0.2)) as client:
        with pytest.raises(DeadlineExceeded):
            await client.infer("slow", {"x": np.zeros(1, np.float32)})
    rec.infer_attempts, rec.fail_first = 0, 2
    async with AsyncTaskServeClient(fake_server.target) as client:
        await client.infer("echo", {"x": np.zeros(1, np.float32)})
    assert rec.infer_attempts == 3
    rec.infer_attempts, rec.fail_first = 0, 1
    async with AsyncTaskServeClient(fake_server.target, ClientOptions(retry=None)) as client:
        with pytest.raises(Unavailable):
            await client.infer("echo", {"x": np.zeros(1, np.float32)})


async def test_wait_until_ready(fake_server: ServerThread, rec: Recorder) -> None:
    async with AsyncTaskServeClient(fake_server.target) as client:
        await client.wait_until_ready("echo", timeout=5)
        rec.ready = False
        with pytest.raises(DeadlineExceeded, match="server not ready"):
            await client.wait_until_ready(timeout=0.3)
