"""KServe v2 REST (Open Inference Protocol over HTTP): ``/v2``, ``/v2/health/live|ready``,
``/v2/models/{m}[/versions/{v}]``, ``/ready``, ``/config``, ``/infer`` (JSON tensors and the
binary tensor data extension, http/v2_codec.py), the repository extension (index, load,
unload under ``--model-control-mode``) and the generate extension (``/generate``,
``/generate_stream`` as server-sent events) for generating models.

Every operation is the gRPC door's (v2/service.py, v2/faces.py); errors raised here leave
as KServe's ``{"error": "<message>"}`` body with the status of their class (http/errors.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from google.protobuf import json_format
from starlette.responses import Response

from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.http import v2_codec
from taskserve.server.frontends.http.errors import describe
from taskserve.server.frontends.http.sse import EventStream, event
from taskserve.server.frontends.parts import ServingParts
from taskserve.server.frontends.v2.faces import Faces, is_decoupled
from taskserve.server.frontends.v2.model_config import model_config_message
from taskserve.server.frontends.v2.service import EXTENSIONS, SERVER_NAME, SERVER_VERSION, V2Service, call_options
from taskserve.server.frontends.v2.tensors import check_complete, check_shape, check_utf8, decode_values, spec_of
from taskserve.server.serving.loaded_model import LoadedModel


def _status(ok: bool) -> Response:
    # Triton answers readiness with the status alone; 503 tells probes "not now".
    return Response(status_code=200 if ok else 503)


async def _json_body(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body:
        return {}
    parsed, _ = v2_codec.split_body(body, None)
    if not isinstance(parsed, dict):
        raise InvalidInput("the request body must be a JSON object")
    return parsed


def build_router(parts: ServingParts) -> APIRouter:
    """The v2 REST routes over ``parts`` (shared with the gRPC door)."""
    router = APIRouter()
    faces = Faces(parts.tasks, parts.models.get)
    service = V2Service(parts.models, faces, parts.ready, parts.settings.model_control_mode, protocol="http")
    write_timeout = parts.settings.stream_write_timeout_s

    @router.get("/v2")
    async def server_metadata() -> dict[str, object]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": EXTENSIONS}

    @router.get("/v2/health/live")
    async def live() -> Response:
        return _status(True)

    @router.get("/v2/health/ready")
    async def ready() -> Response:
        return _status(service.server_ready())

    @router.get("/v2/models/{name}")
    @router.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str = "") -> dict[str, object]:
        meta = service.model_metadata(name, version)
        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.inputs],
            "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in meta.outputs],
        }

    @router.get("/v2/models/{name}/ready")
    @router.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "") -> Response:
        return _status(service.model_ready(name, version))

    @router.get("/v2/models/{name}/config")
    @router.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str = "") -> dict[str, Any]:
        model = service.model(name, version)
        message = model_config_message(model, faces)
        config: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
        return config

    @router.post("/v2/models/{name}/infer")
    @router.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(request: Request, name: str, version: str = "") -> Response:
        model = service.model(name, version)
        body = await request.body()
        json_length, config = request.headers.get(v2_codec.HEADER_LENGTH), faces.config(model)
        if len(body) <= v2_codec.INLINE_BODY_BYTES:
            decoded = v2_codec.decode_request(body, json_length, config)
        else:  # parsing and checking a large body would hold every caller: the worker pool does it
            loop = asyncio.get_running_loop()
            workers = parts.tasks.context.executor
            decoded = await loop.run_in_executor(workers, v2_codec.decode_request, body, json_length, config)
        options = call_options(decoded.parameters)
        outputs = await service.infer(model, decoded.tensors, decoded.outputs, decoded.parameters, options)
        content, header_length = v2_codec.encode_response(model.name, model.version, decoded, outputs)
        if header_length is None:
            return Response(content, media_type="application/json")
        return Response(
            content,
            media_type="application/octet-stream",
            headers={"Inference-Header-Content-Length": str(header_length)},
        )

    @router.post("/v2/repository/index")
    async def repository_index(request: Request) -> list[dict[str, object]]:
        body = await _json_body(request)
        entries = service.index(ready_only=body.get("ready") is True)
        return [{"name": e.name, "version": e.version, "state": e.state.value, "reason": e.reason} for e in entries]

    @router.post("/v2/repository/models/{name}/load")
    async def load(name: str) -> dict[str, object]:
        await service.load(name)
        return {}

    @router.post("/v2/repository/models/{name}/unload")
    async def unload(name: str) -> dict[str, object]:
        await service.unload(name)
        return {}

    @router.post("/v2/models/{name}/generate")
    @router.post("/v2/models/{name}/versions/{version}/generate")
    async def generate(request: Request, name: str, version: str = "") -> dict[str, object]:
        model, tensors, params = await _generate_request(service, request, name, version, streaming=False)
        outputs = await service.infer(model, tensors, None, params, call_options(params))
        return _generate_body(model, outputs)

    @router.post("/v2/models/{name}/generate_stream")
    @router.post("/v2/models/{name}/versions/{version}/generate_stream")
    async def generate_stream(request: Request, name: str, version: str = "") -> Response:
        model, tensors, params = await _generate_request(service, request, name, version, streaming=True)
        responses = service.stream(model, tensors, params, call_options(params))
        try:
            # The first response (or the refusal) before any byte is sent: a bad request gets its status.
            first = await anext(responses)
        except BaseException:
            await responses.aclose()
            raise
        return EventStream(_events(model, first, responses), write_timeout, _error_event)

    return router


async def _generate_request(
    service: V2Service, request: Request, name: str, version: str, streaming: bool
) -> tuple[LoadedModel, dict[str, np.ndarray], dict[str, object]]:
    """Triton's generate extension: each top-level key but ``parameters`` is an input by name
    (a scalar or a one-element list), ``parameters`` the request parameters."""
    model = service.model(name, version)
    if not is_decoupled(model):
        raise InvalidInput(
            f"model {model.name!r} does not generate text; the generate extension serves text-generation models "
            f"(call /v2/models/{model.name}/infer)"
        )
    body = await _json_body(request)
    params = v2_codec.parameters_of(body.pop("parameters", None), "parameters")
    config = service.faces.config(model)
    specs = {t.name: t for t in config.inputs or ()}
    tensors: dict[str, np.ndarray] = {}
    for key, value in body.items():
        spec = specs.get(key)
        if spec is None:
            raise InvalidInput(f"model {model.name!r} has no input {key[:40]!r}; its inputs are {sorted(specs)}")
        if key == "sampling_parameters" and isinstance(value, dict):
            value = json.dumps(value)  # an object is accepted as well as its JSON text
        values = value if isinstance(value, list) else [value]
        if spec.datatype == "BYTES":
            if not all(isinstance(v, str) for v in values):
                raise InvalidInput(f"input {key!r} must be a string")
            values = [str(v).encode("utf-8") for v in values]
        elif spec.datatype == "BOOL" and not all(isinstance(v, bool) for v in values):
            raise InvalidInput(f"input {key!r} must be true or false")
        spec_of(config, specs, key, spec.datatype)
        shape = (len(values),)
        check_shape(config, spec, shape)
        array = decode_values(key, spec.datatype, shape, values)
        if spec.datatype == "BYTES":
            check_utf8(key, array)
        tensors[key] = array
    if streaming and "stream" not in tensors and "stream" not in params:
        tensors["stream"] = np.array([True])  # generate_stream streams unless the request says otherwise
    check_complete(config, tensors)
    return model, tensors, params


def _generate_body(model: LoadedModel, outputs: dict[str, np.ndarray]) -> dict[str, object]:
    body: dict[str, object] = {"model_name": model.name, "model_version": model.version}
    for name, array in outputs.items():
        values = [bytes(v).decode("utf-8") if array.dtype == np.object_ else v for v in array.reshape(-1).tolist()]
        body[name] = values[0] if len(values) == 1 else values
    return body


async def _events(
    model: LoadedModel,
    first: tuple[dict[str, np.ndarray], bool],
    rest: AsyncGenerator[tuple[dict[str, np.ndarray], bool], None],
) -> AsyncGenerator[bytes, None]:
    """One server-sent event per response (http/sse.py writes them with backpressure and
    turns an error after the first into a last ``data: {"error": ...}`` event)."""
    try:
        yield event(_generate_body(model, first[0]))
        async for outputs, _ in rest:
            yield event(_generate_body(model, outputs))
    finally:
        await rest.aclose()  # a client gone stops the generation now


def _error_event(err: BaseException) -> bytes:
    return event({"error": describe(err).message})
