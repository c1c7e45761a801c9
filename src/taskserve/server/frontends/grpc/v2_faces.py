"""ModelInfer and ModelStreamInfer for models with a v2 face (frontends/v2/faces.py):
protobuf in and out around the protocol-neutral faces.

A decoupled model (text generation) answers a streamed request with one response per
chunk; each carries the ``triton_final_response`` parameter, true on the last, as
Triton does. A request with ``triton_enable_empty_final_response`` set gets its last
chunk flagged false and an extra empty response flagged true (Triton's way to end a
stream whose last chunk was already sent).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.grpc import codec
from taskserve.server.frontends.grpc.deadlines import request_deadline
from taskserve.server.frontends.v2.faces import Faces, is_decoupled
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.tasks.base import CallOptions

Context = grpc.aio.ServicerContext[Any, Any]

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
_SCALARS = ("bool_param", "int64_param", "uint64_param", "double_param", "string_param")


def parameters(request: pb.ModelInferRequest) -> dict[str, object]:
    """The request parameters as plain values."""
    values: dict[str, object] = {}
    for key, param in request.parameters.items():
        which = param.WhichOneof("parameter_choice")
        if which in _SCALARS:
            values[key] = getattr(param, which)
    return values


def _options(request: pb.ModelInferRequest, context: Context) -> CallOptions:
    priority = timeout_us = None
    if request.parameters:
        priority = codec.int_parameter(request.parameters, "priority")
        timeout_us = codec.int_parameter(request.parameters, "timeout")
    return CallOptions(priority=priority or None, deadline=request_deadline(context, timeout_us))


def _response(model: LoadedModel, request: pb.ModelInferRequest, outputs: Any) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
    names = tuple(outputs)
    if request.outputs:
        wanted = {o.name for o in request.outputs}
        names = tuple(n for n in names if n in wanted)
    codec.encode_outputs(response, outputs, names)
    return response


async def infer(
    faces: Faces, model: LoadedModel, request: pb.ModelInferRequest, context: Context
) -> pb.ModelInferResponse:
    """The whole answer, as one ModelInferResponse."""
    config = faces.config(model)
    tensors = codec.decode_inputs(request, config)
    if request.outputs:
        codec.requested_outputs(request, config)  # unknown names: InvalidInput
    options = _options(request, context)
    # The lease: a swap of this version lets it finish the request.
    with model.leases.hold(), model.metrics.track_request(time.perf_counter_ns(), options.deadline):
        with faces.tasks.context.admit():
            outputs = await faces.infer(model, tensors, parameters(request), options)
    return _response(model, request, outputs)


async def stream(
    faces: Faces, model: LoadedModel, request: pb.ModelInferRequest, context: Context
) -> AsyncIterator[tuple[pb.ModelInferResponse, bool]]:
    """(response, last) for one request on ModelStreamInfer; errors raise (the caller sends
    them in-band)."""
    config = faces.config(model)
    tensors = codec.decode_inputs(request, config)
    if request.outputs:
        codec.requested_outputs(request, config)
    values = parameters(request)
    empty_final = values.get(EMPTY_FINAL)
    if empty_final is not None and not isinstance(empty_final, bool):
        raise InvalidInput(f"parameter {EMPTY_FINAL!r} must be a bool")
    decoupled = is_decoupled(model)
    options = _options(request, context)
    started = time.perf_counter_ns()
    with model.leases.hold(), model.metrics.track_request(started, options.deadline), faces.tasks.context.admit():
        responses = faces.stream(model, tensors, values, options)
        first = True
        try:
            async for outputs, last in responses:
                if first:
                    model.metrics.first_chunk("grpc", (time.perf_counter_ns() - started) / 1e9)
                    first = False
                response = _response(model, request, outputs)
                if decoupled:
                    response.parameters[FINAL].bool_param = last and not empty_final
                yield response, last and not (decoupled and empty_final)
        finally:
            await responses.aclose()
    if decoupled and empty_final:
        final = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
        final.parameters[FINAL].bool_param = True
        yield final, True
