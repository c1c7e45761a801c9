"""Names have a length limit, checked first; messages quote at most a short prefix of what a
caller sent. Every RPC that takes a model name, v2 and typed, is walked."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from taskserve.protocol.generated import taskserve as typed_package
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.errors import quoted
from tests.support.server import ServerThread, running_server

HUGE = "m" * 100_000
# What a message that quotes a short prefix (and names the limit) stays under.
SHORT = 400


@pytest.fixture(scope="module")
def server(small_repository: Path) -> Iterator[ServerThread]:
    with running_server(small_repository, model_control_mode="explicit") as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _assert_refused(err: grpc.RpcError, what: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.code(), (err.details() or "")[:200])
    details = err.details() or ""
    assert len(details) < SHORT, (what, len(details))
    assert "limit" in details, (what, details)


V2_CALLS = [
    ("ModelReady", pb.ModelReadyRequest(name=HUGE)),
    ("ModelReady", pb.ModelReadyRequest(name="simple", version=HUGE)),
    ("ModelMetadata", pb.ModelMetadataRequest(name=HUGE)),
    ("ModelMetadata", pb.ModelMetadataRequest(name="simple", version=HUGE)),
    ("ModelConfig", pb.ModelConfigRequest(name=HUGE)),
    ("ModelStatistics", pb.ModelStatisticsRequest(name=HUGE)),
    ("ModelInfer", pb.ModelInferRequest(model_name=HUGE)),
    ("ModelInfer", pb.ModelInferRequest(model_name="simple", model_version=HUGE)),
    ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=HUGE)),
    ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=HUGE)),
]


@pytest.mark.parametrize(("method", "request_message"), V2_CALLS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(V2_CALLS)])
def test_v2_rpcs_refuse_a_huge_name_first(channel: grpc.Channel, method: str, request_message: Any) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    with pytest.raises(grpc.RpcError) as err:
        getattr(stub, method)(request_message, timeout=10)
    _assert_refused(err.value, method)


def test_model_stream_infer_answers_a_huge_name_in_band_with_a_short_message(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    answers = list(stub.ModelStreamInfer(iter([pb.ModelInferRequest(model_name=HUGE, id="x")]), timeout=10))
    assert len(answers) == 1
    message = answers[0].error_message
    assert message and len(message) < SHORT and "limit" in message


def _typed_methods() -> list[tuple[str, Any, bool]]:
    """(full method path, request class, response streaming) of every typed service."""
    found = []
    for info in pkgutil.iter_modules(typed_package.v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"{typed_package.v1.__name__}.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                request_class = getattr(module, method.input_type.name, None)
                if request_class is None:  # an input type from another file
                    from google.protobuf import message_factory

                    request_class = message_factory.GetMessageClass(method.input_type)
                found.append((f"/{service.full_name}/{method.name}", request_class, method.server_streaming))
    return sorted(found, key=lambda m: m[0])


TYPED = _typed_methods()


def test_every_typed_method_is_walked() -> None:
    assert len(TYPED) >= 20
    assert all("model" in cls.DESCRIPTOR.fields_by_name for _, cls, _ in TYPED)


@pytest.mark.parametrize(("path", "request_class", "streaming"), TYPED, ids=[p for p, _, _ in TYPED])
def test_typed_rpcs_refuse_a_huge_name_first(
    channel: grpc.Channel, path: str, request_class: Any, streaming: bool
) -> None:
    request = request_class()
    request.model.name = HUGE
    serialize, parse = request_class.SerializeToString, lambda data: data
    if streaming:
        call: Any = channel.unary_stream(path, request_serializer=serialize, response_deserializer=parse)
        with pytest.raises(grpc.RpcError) as err:
            list(call(request, timeout=10))
    else:
        call = channel.unary_unary(path, request_serializer=serialize, response_deserializer=parse)
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
    _assert_refused(err.value, path)


def test_names_under_the_limit_that_name_nothing_are_quoted_short(channel: grpc.Channel) -> None:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    name = "n" * 250
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert quoted(name) in (err.value.details() or "") and name not in (err.value.details() or "")
    infer = pb.ModelInferRequest(model_name="simple")
    infer.inputs.add(name="x" * 10_000, datatype="Q" * 10_000, shape=[1, 4])
    infer.outputs.add(name="y" * 10_000)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(infer, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(err.value.details() or "") < SHORT


def test_quoted_caps_what_it_echoes() -> None:
    assert quoted("simple") == "'simple'"
    long = quoted("a" * 1000)
    assert len(long) < 100 and "1000 characters" in long
    assert "2000 bytes" in quoted(b"\xff" * 2000)
