"""Issue 11, items 5 and 6: malformed messages, limits enforced before heavy work,
streams in flight, failure reasons."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import grpc
import numpy as np
import pytest
from PIL import Image

from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2, text_classification_pb2
from taskserve.server.errors import LimitExceeded
from taskserve.server.tasks.images import check_request_pixels, declared_size
from tests.support.server import ServerThread
from tests.support.waiting import wait_until

from .conftest import SLOW_ROWS, TEXTCLS
from .v2 import infer_request

METHODS = [
    "/inference.GRPCInferenceService/ModelInfer",
    "/inference.GRPCInferenceService/ServerReady",
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/taskserve.v1.TextClassification/Classify",
]


def _raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=30)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return,attr-defined]
    return grpc.StatusCode.OK


def test_malformed_messages_get_invalid_argument_without_a_traceback(
    robust_channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(1)
    # Field 1 as a varint with a truncated payload, a length prefix past the end, random bytes.
    payloads = [b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x80\x01abc", *(rng.bytes(64) for _ in range(20))]
    caplog.set_level(logging.INFO)
    codes = {(m, _raw_call(robust_channel, m, p)) for m in METHODS for p in payloads}
    assert {code for _, code in codes} <= {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK}
    assert (METHODS[0], grpc.StatusCode.INVALID_ARGUMENT) in codes
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_malformed_messages_in_a_stream_end_it_with_invalid_argument(robust_channel: grpc.Channel) -> None:
    call = robust_channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer", request_serializer=None, response_deserializer=None
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(call(iter([b"\x0a\xff\xff\xff\xff\x0f"]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_variable_dims_over_the_limit_are_refused_before_batching(robust_channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(robust_channel)
    ids = np.full((1, 70_000), 7, np.int64)  # over the default --max-variable-dim 65536
    request = infer_request(TEXTCLS, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=0 * ids)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "limits.max_variable_dim" in caught.value.details()  # type: ignore[attr-defined]


def test_typed_items_over_the_limit_name_the_limit(robust_channel: grpc.Channel) -> None:
    stub = robust_channel.unary_unary(
        "/taskserve.v1.TextClassification/Classify",
        request_serializer=text_classification_pb2.ClassifyTextRequest.SerializeToString,
        response_deserializer=text_classification_pb2.ClassifyTextResponse.FromString,
    )
    request = text_classification_pb2.ClassifyTextRequest(
        model=common_pb2.ModelRef(name=TEXTCLS), texts=["a"] * 300
    )
    with pytest.raises(grpc.RpcError) as caught:
        stub(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "--max-items" in caught.value.details()  # type: ignore[attr-defined]


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but whose pixels would take long to decode."""
    small = io.BytesIO()
    Image.new("RGB", (8, 8)).save(small, format="PNG")
    data = bytearray(small.getvalue())
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    return bytes(data)


def test_request_pixels_are_checked_on_the_headers_before_decoding() -> None:
    # 32 images of 39.7 MP: each under the per-image limit, together far over the per-request one.
    images = [_png_header_only(7_300, 5_440)] * 32
    assert declared_size(images[0]) == (7_300, 5_440)
    started = time.perf_counter()
    with pytest.raises(LimitExceeded, match="over the limit of 100000000 per request.*--max-request-pixels"):
        check_request_pixels(images, 40_000_000, 100_000_000, "images")
    assert time.perf_counter() - started < 0.5  # headers only: decoding them took ~23 s of CPU
    check_request_pixels(images[:2], 40_000_000, 100_000_000, "images")  # 79 MP together: fine


def test_streams_with_work_in_flight_are_limited(robust_server: ServerThread) -> None:
    """--max-streams (4 here) counts ModelStreamInfer streams with requests in flight or answers
    unsent; idle streams do not count (tests/robustness/test_slow_readers.py)."""
    own = ("grpc.use_local_subchannel_pool", 1)  # a TCP connection of its own
    not_reading = [own, ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1)]
    ones = np.ones((1, 4), np.float32)
    request = infer_request("simple", INPUT0=ones, INPUT1=ones)

    async def scenario() -> tuple[str, str]:
        async with (
            grpc.aio.insecure_channel(robust_server.address, options=not_reading) as slow,
            grpc.aio.insecure_channel(robust_server.address, options=[own]) as good,
        ):
            # Four streams whose client reads one answer of eight and stops: their unsent
            # answers keep them busy (until the write timeout, 30 s by default).
            held = [pb_grpc.GRPCInferenceServiceStub(slow).ModelStreamInfer(iter([request] * 8)) for _ in range(4)]
            for call in held:
                assert not (await call.read()).error_message
            stub = pb_grpc.GRPCInferenceServiceStub(good)
            refused = [a async for a in stub.ModelStreamInfer(iter([request]), timeout=30)][0].error_message
            for call in held:
                call.cancel()
            # ...and once they close, a new stream's requests are served again.
            deadline = time.monotonic() + 10
            while (answer := [a async for a in stub.ModelStreamInfer(iter([request]), timeout=30)][0]).error_message:
                assert time.monotonic() < deadline, answer.error_message
                await asyncio.sleep(0.05)
            return refused, answer.error_message

    refused, served = asyncio.run(scenario())
    assert "4 ModelStreamInfer streams with requests in flight" in refused and "--max-streams" in refused
    assert served == ""


def test_a_client_deadline_counts_as_timeout(robust_server: ServerThread, robust_channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(robust_channel)
    # 512 rows compute for ~2.5 s here (several times the deadline on any CPU), and a
    # 250 ms deadline leaves ample time for the request to reach the handler even on a
    # loaded machine: the server sees the request and its deadline passes there.
    big = np.ones((512, 1024), np.float32)
    before = _failures(robust_server, SLOW_ROWS, "timeout")
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer_request(SLOW_ROWS, INPUT0=big), timeout=0.25)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    # The server counts the failure when gRPC cancels its handler, around the time the client gives up.
    wait_until(lambda: _failures(robust_server, SLOW_ROWS, "timeout") != before, "the server to count the failure")
    assert _failures(robust_server, SLOW_ROWS, "timeout") == before + 1
    assert _failures(robust_server, SLOW_ROWS, "cancelled") == 0
    # One instance: a small request without a deadline returns once the abandoned
    # compute is over, so that compute does not spill into the next tests.
    stub.ModelInfer(infer_request(SLOW_ROWS, INPUT0=np.ones((1, 1024), np.float32)), timeout=60)


def _failures(server: ServerThread, model: str, reason: str) -> float:
    from prometheus_client import generate_latest

    assert server.app is not None
    prefix = f'taskserve_request_failure_total{{model="{model}",reason="{reason}",'
    for line in generate_latest(server.app.metrics.registry).decode().splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


