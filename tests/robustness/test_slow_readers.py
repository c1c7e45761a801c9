"""Clients that do not read must not hold the server (frontends/grpc/streams.py).

A client that truly stops reading: its channel turns BDP probing off and asks for a
1-byte lookahead, so its HTTP/2 window stays tiny and the server's second write waits
(grpc's client otherwise buffers megabytes on its own). Each connection here is its own
TCP connection (``grpc.use_local_subchannel_pool``): channels to one address share one
otherwise, and the per-connection cap is keyed on the connection.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml
from onnx import TensorProto

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests.robustness.v2 import infer_request
from tests.support.server import ServerProcess, ServerThread, running_server
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry
from tests.support.waiting import wait_until

SLOTS = 4  # the tiny decoder's task_options.max_concurrent_generations
PER_CONNECTION = 2
WRITE_TIMEOUT_S = 1.0
WIDE = 65_536  # floats per row of the "wide" identity model: 256 KiB answers
_SLOW_READER = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1)]
_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskserve.exporters.api import export_hf
    from tests.support import tiny_hf_models as tiny_models

    repo = tmp_path_factory.mktemp("slow-readers-repo")
    source = tiny_models.tiny_causal_lm(tmp_path_factory.mktemp("slow-readers-src") / "tiny-llama", hidden_size=64)
    export_hf(source, "text-generation", repo, "tiny-llama", progress=False, max_queue_delay_us=1000)
    path = repo / "tiny-llama" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["task_options"]["max_concurrent_generations"] = SLOTS
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    write_entry(repo, "wide", identity_graph(TensorProto.FLOAT, ["batch", WIDE]), {"max_batch_size": 8})
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerThread]:
    with running_server(
        repository,
        stream_write_timeout_s=WRITE_TIMEOUT_S,
        max_streams_per_connection=PER_CONNECTION,
        max_streams=SLOTS,
    ) as running:
        yield running


def _connection(address: str, reads: bool = True) -> grpc.Channel:
    return grpc.insecure_channel(
        address, options=[("grpc.use_local_subchannel_pool", 1), *(() if reads else _SLOW_READER)]
    )


def _generate() -> tg.GenerateRequest:
    return tg.GenerateRequest(model=common.ModelRef(name="tiny-llama"), prompt="The cat", max_new_tokens=100)


def _simple() -> pb.ModelInferRequest:
    ones = np.ones((1, 4), np.float32)
    return infer_request("simple", INPUT0=ones, INPUT1=ones)


def _rpcs_running(server: ServerThread, method: str) -> int:
    """The server's grpc handler tasks for ``method`` (grpc names them after it)."""

    async def count() -> int:
        return sum(1 for t in asyncio.all_tasks() if t.get_name() == f"HandleExceptions[{method}]")

    return int(server.run(count(), timeout=10))


def _open_unread_streams(channel: grpc.Channel, count: int) -> list[Any]:
    stub = tg_grpc.TextGenerationStub(channel)
    calls = [stub.Generate(_generate(), timeout=60) for _ in range(count)]
    for call in calls:
        next(call)  # the first chunk arrived: the stream runs, holding a generation slot
    return calls


def test_streams_whose_client_stops_reading_end_and_free_their_slots(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    slow = [_connection(server.address, reads=False) for _ in range(SLOTS // PER_CONNECTION)]
    good = _connection(server.address)
    try:
        # Every generation slot is taken by a client that reads one chunk and stops.
        held = [call for channel in slow for call in _open_unread_streams(channel, PER_CONNECTION)]

        # A client that reads gets its stream once the write timeout has ended theirs
        # (waited on as a status: RESOURCE_EXHAUSTED until then; before the fix, forever).
        def served() -> bool:
            try:
                return bool(list(tg_grpc.TextGenerationStub(good).Generate(_generate(), timeout=30)))
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                return False

        wait_until(served, "a reading client to get a generation slot", timeout=20, interval=0.05)
        # The unread streams were ended, not finished: reading them now shows why.
        for call in held:
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "--stream-write-timeout" in ended.value.details()
        assert len([r for r in caplog.records if "ended a stream" in r.getMessage()]) == SLOTS
    finally:
        for channel in [*slow, good]:
            channel.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_a_connection_holds_at_most_its_cap_of_streams(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    channel = _connection(server.address, reads=False)

    def refused(call: Callable[[], object]) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        return caught.value

    try:
        held = _open_unread_streams(channel, PER_CONNECTION)
        err = refused(lambda: list(tg_grpc.TextGenerationStub(channel).Generate(_generate(), timeout=30)))
        assert f"{PER_CONNECTION} streams open" in err.details()
        assert "--max-streams-per-connection" in err.details()
        # The cap covers every response stream of the connection, ModelStreamInfer too.
        stream_infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
        refused(lambda: list(stream_infer(iter([_simple()]), timeout=30)))
        # Streams ended by the write timeout count until their client reads or leaves
        # (each still holds its unsent answer and status).
        wait_until(lambda: sum("ended a stream" in r.getMessage() for r in caplog.records) == PER_CONNECTION,
                   "the write timeout to end the unread streams")  # fmt: skip
        refused(lambda: list(stream_infer(iter([_simple()]), timeout=30)))
        for call in held:
            with pytest.raises(grpc.RpcError) as ended:
                list(call)
            assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert list(tg_grpc.TextGenerationStub(channel).Generate(_generate(), timeout=30))
    finally:
        channel.close()


def test_clients_that_go_away_are_logged_without_a_traceback(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    method = "/taskserve.v1.TextGeneration/Generate"
    channel = _connection(server.address, reads=False)
    try:
        for call in _open_unread_streams(channel, PER_CONNECTION):
            call.cancel()
        wait_until(lambda: _rpcs_running(server, method) == 0, "the cancelled streams to end")
    finally:
        channel.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_idle_stream_infer_streams_do_not_keep_other_callers_out(server: ServerThread) -> None:
    """--max-streams is 4 here: four streams that never send a request (two connections at
    their cap) used to be four open streams, the limit, and every other caller got RESOURCE_EXHAUSTED."""
    idle = [_connection(server.address) for _ in range(SLOTS // PER_CONNECTION)]
    other = _connection(server.address)
    never = threading.Event()

    def nothing() -> Iterator[pb.ModelInferRequest]:
        never.wait()
        yield from ()

    calls = []
    try:
        for channel in idle:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls += [stub.ModelStreamInfer(nothing()) for _ in range(PER_CONNECTION)]
        wait_until(lambda: _rpcs_running(server, _STREAM_INFER) == SLOTS, "the idle streams to open")
        answers = list(pb_grpc.GRPCInferenceServiceStub(other).ModelStreamInfer(iter([_simple()] * 3), timeout=30))
        assert [a.error_message for a in answers] == ["", "", ""]
        # The per-connection cap still applies to idle streams.
        with pytest.raises(grpc.RpcError) as refused:
            list(pb_grpc.GRPCInferenceServiceStub(idle[0]).ModelStreamInfer(iter([_simple()]), timeout=30))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        never.set()
        for call in calls:
            call.cancel()
        for channel in [*idle, other]:
            channel.close()
    wait_until(lambda: _rpcs_running(server, _STREAM_INFER) == 0, "the idle streams to close")


def _rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    assert match is not None
    return int(match[1])


def _successes(channel: grpc.Channel, model: str) -> int:
    stats = pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return sum(s.inference_stats.success.count for s in stats.model_stats)


def test_a_stream_infer_client_that_does_not_read_keeps_server_memory_bounded(repository: Path) -> None:
    """600 requests for 256 KiB answers on one stream whose client reads none of them. Before
    the fix the server read them all and queued 150 MiB of answers (and kept the memory
    after the stream closed); now it stops reading at 64 requests in flight or unsent and
    ends the stream after the write timeout."""
    requests_sent = 600
    server = ServerProcess(repository, "--stream-write-timeout", "2")
    try:
        pid = server.proc.pid
        request = infer_request("wide", INPUT0=np.ones((1, WIDE), np.float32))
        with _connection(server.address) as control:
            wait_until(lambda: pb_grpc.GRPCInferenceServiceStub(control).ModelReady(
                pb.ModelReadyRequest(name="wide"), timeout=10).ready, "the model to load")  # fmt: skip
            warm = list(pb_grpc.GRPCInferenceServiceStub(control).ModelStreamInfer(iter([request] * 16), timeout=30))
            assert not any(a.error_message for a in warm)
            baseline = _rss_kib(pid, "VmHWM")

            async def never_read() -> None:
                async with grpc.aio.insecure_channel(
                    server.address, options=[("grpc.use_local_subchannel_pool", 1), *_SLOW_READER]
                ) as channel:
                    call = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request] * requests_sent))
                    await call.wait_for_connection()

                    def done() -> bool:
                        # Version-agnostic: the server answered every request (it read them all),
                        # or it ended the stream of a client that does not read.
                        ended = any("ended a stream" in line for line in server.output)
                        return ended or _successes(control, "wide") >= 16 + requests_sent

                    await asyncio.to_thread(wait_until, done, "the server to answer all or end the stream", 60)
                    call.cancel()

            asyncio.run(never_read())
            grown_mib = (_rss_kib(pid, "VmHWM") - baseline) / 1024
            assert grown_mib < 60, f"server peak RSS grew {grown_mib:.0f} MiB for one stream that reads nothing"
            # Closed: nothing is kept, and the service answers.
            again = list(pb_grpc.GRPCInferenceServiceStub(control).ModelStreamInfer(iter([request]), timeout=30))
            assert not again[0].error_message
            kept_mib = (_rss_kib(pid, "VmRSS") - baseline) / 1024
            assert kept_mib < 60, f"{kept_mib:.0f} MiB more than before the stream, after it closed"
    finally:
        server.terminate()
        server.wait()
