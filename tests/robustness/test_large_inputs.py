"""Large inputs never block the event loop: a big v2 BYTES tensor is decoded and validated on
the worker pool while other callers are served, and per-element work has a cap (the element
count is checked before any element is decoded; the declared shape bounds the decoding)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from onnx import TensorProto

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc import codec
from taskserve.server.settings import ServerSettings
from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import identity_graph, write_entry

# Empty BYTES elements: 4 bytes each on the wire, one Python object each to decode and check.
BIG_ELEMENTS = 3_000_000
MODEL_CAP = 1_000


@pytest.fixture(scope="module")
def bytes_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("bytes-repo")
    graph = identity_graph(TensorProto.STRING, ["batch", "n"])
    write_entry(repo, "bytes", graph, {"max_batch_size": 8})
    write_entry(repo, "bytes-capped", graph, {"max_batch_size": 8, "limits": {"max_bytes_elements": MODEL_CAP}})
    # The server's cap raised above BIG_ELEMENTS, so the big request is decoded in full (and then
    # refused by max_variable_dim, after decoding): the slow path whose place is under test.
    with running_server(repo, max_bytes_elements=BIG_ELEMENTS + 1) as server:
        yield server


def _bytes_request(model: str, elements: int, declared: int | None = None) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, elements if declared is None else declared])
    request.raw_input_contents.append(b"\x00\x00\x00\x00" * elements)
    return request


def test_a_big_bytes_tensor_does_not_hold_other_callers(
    bytes_server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    started, finished = threading.Event(), threading.Event()
    decode = codec.decode_inputs

    def watched(request: Any, config: Any) -> Any:
        started.set()
        try:
            return decode(request, config)
        finally:
            finished.set()

    monkeypatch.setattr(codec, "decode_inputs", watched)
    big = _bytes_request("bytes", BIG_ELEMENTS)
    with (
        grpc.insecure_channel(bytes_server.address) as slow_channel,
        grpc.insecure_channel(bytes_server.address) as other_channel,
        ThreadPoolExecutor(1) as pool,
    ):
        live = pb_grpc.GRPCInferenceServiceStub(other_channel)
        assert live.ServerLive(pb.ServerLiveRequest(), timeout=30).live  # connected before
        pending = pool.submit(pb_grpc.GRPCInferenceServiceStub(slow_channel).ModelInfer, big, timeout=300)
        assert started.wait(120), "the big request never reached decoding"
        # Served while the big tensor is still being decoded: the event loop is free.
        assert live.ServerLive(pb.ServerLiveRequest(), timeout=120).live
        assert not finished.is_set(), "ServerLive waited for the big decode: it ran on the event loop"
        with pytest.raises(grpc.RpcError) as err:
            pending.result(300)
    # Decoded in full, then refused by the variable-dim limit: INVALID_ARGUMENT, not a hang.
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert finished.is_set()


def test_bytes_past_the_element_cap_are_refused_before_decoding(bytes_server: ServerThread) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(bytes_server.address))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(_bytes_request("bytes-capped", MODEL_CAP + 1), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert f"{MODEL_CAP + 1} BYTES elements" in details and f"limit of {MODEL_CAP}" in details
    assert "max_bytes_elements" in details
    # The same count in typed contents is refused the same way.
    typed = pb.ModelInferRequest(model_name="bytes-capped")
    tensor = typed.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, MODEL_CAP + 1])
    tensor.contents.bytes_contents.extend([b""] * (MODEL_CAP + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(typed, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of" in (err.value.details() or "")
    # Under the cap it is served.
    ok = stub.ModelInfer(_bytes_request("bytes-capped", MODEL_CAP), timeout=30)
    assert list(ok.outputs[0].shape) == [1, MODEL_CAP]


def test_decoding_stops_at_the_declared_shape() -> None:
    """A shape that declares 2 elements over contents of a million (and a truncated tail): the
    refusal names the surplus found after the third element, not the tail a full pass would reach."""
    from taskserve.protocol.datatypes import deserialize_bytes_tensor

    raw = b"\x00\x00\x00\x00" * 1_000_000 + b"\x01"
    with pytest.raises(ValueError, match="more than the 2 elements"):
        deserialize_bytes_tensor(raw, 2)


def test_the_limits_have_flags_and_safe_defaults(tmp_path: Path) -> None:
    from taskserve.server.main import parse_args

    assert (ServerSettings.max_bytes_elements, ServerSettings.max_name_chars) == (65_536, 255)
    settings = parse_args(["--model-repository", str(tmp_path), "--max-bytes-elements", "10", "--max-name-chars", "20"])
    assert (settings.max_bytes_elements, settings.max_name_chars) == (10, 20)
