"""The KServe v2 / Open Inference Protocol servicer (``inference.GRPCInferenceService``).

Thin: decode -> scheduler -> encode. Model lookup, batching and execution
live below; this module only speaks protobuf.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import grpc

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.errors import InvalidInput, Overloaded
from taskserve.server.frontends.grpc import codec, v2_faces
from taskserve.server.frontends.grpc.deadlines import request_deadline
from taskserve.server.frontends.grpc.status import describe, unary
from taskserve.server.frontends.v2.faces import FACED_TASKS, Faces, has_face
from taskserve.server.frontends.v2.model_config import model_config_message
from taskserve.server.frontends.v2.service import describe_model, load_model, unload_model
from taskserve.server.metrics import Duration
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.serving.manager import ModelManager, ModelState
from taskserve.server.tasks.base import TaskCache

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

SERVER_NAME = "taskserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "statistics", "model_configuration", "health", "metrics"]
# Most requests a ModelStreamInfer stream has in flight at once.
STREAM_CONCURRENCY = 64

class V2Servicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        models: ModelManager,
        ready: Any,
        model_control: str = "none",
        max_streams: int = 256,
        workers: Executor | None = None,
        tasks: TaskCache | None = None,
    ) -> None:
        self._models = models
        # The faces of generating models (text_input -> text_output, prompt -> image); they run
        # the typed services' task objects (``tasks``). Without them those models refuse infer.
        self._faces = Faces(tasks, models.get) if tasks is not None else None
        # The pool that decodes large requests (the typed tasks' worker pool): never the event loop.
        self._workers = workers
        # "explicit": RepositoryModelLoad/Unload allowed; "none": the repository is fixed at startup.
        self._model_control = model_control
        # ModelStreamInfer streams with requests in flight or answers unsent; beyond, a request
        # that would make one more busy is answered in-band with RESOURCE_EXHAUSTED.
        self._max_streams = max_streams
        self._streams = 0
        # Callable telling whether the server as a whole is ready (startup done, not draining).
        self._server_ready = ready

    # -- health and metadata ---------------------------------------------------

    @unary
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._server_ready()))

    @unary
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._models.is_ready(request.name, request.version))

    @unary
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=EXTENSIONS)

    @unary
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        meta = describe_model(self._models, self._faces, request.name, request.version)
        response = pb.ModelMetadataResponse(name=meta.name, versions=meta.versions, platform=meta.platform)
        for spec in meta.inputs:
            response.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        for spec in meta.outputs:
            response.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    @unary
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        model = self._models.get(request.name, request.version)
        return pb.ModelConfigResponse(config=model_config_message(model, self._faces))

    @unary
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> pb.ModelStatisticsResponse:
        if request.name:
            models = [self._models.get(request.name, request.version)]
        else:
            models = self._models.loaded_models()
        return pb.ModelStatisticsResponse(model_stats=[_statistics_message(m) for m in models])

    # -- repository ------------------------------------------------------------

    @unary
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for entry in self._models.index():
            if request.ready and entry.state != ModelState.READY:
                continue
            response.models.add(name=entry.name, version=entry.version, state=entry.state.value, reason=entry.reason)
        return response

    @unary
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await load_model(self._models, self._model_control, request.model_name)
        return pb.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await unload_model(self._models, self._model_control, request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------

    async def _infer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        # Every v2 request passes here: written flat (no context managers, no helper for
        # the common cases) because each Python call costs on a tiny model, where this
        # method is most of the server's time (see README, "Results": the floor).
        started = time.perf_counter_ns()
        model = self._models.get(request.model_name, request.model_version)
        if model.config.task in FACED_TASKS and self._faces is not None and has_face(model):
            return await v2_faces.infer(self._faces, model, request, context)
        metrics = model.metrics
        deadline = None
        leases = model.leases  # held until answered: a swap lets this version finish it
        leases.take()
        try:
            config = model.config
            if model.scheduler is None:
                raise InvalidInput(
                    f"model {model.name!r} runs on the generation engine with a resident KV cache; "
                    "use the TextGeneration service"
                )
            inputs = codec.decode_small_inputs(request, config)
            if inputs is None:  # large tensors: decoded and checked on the worker pool, never on the loop
                loop = asyncio.get_running_loop()
                inputs = await loop.run_in_executor(self._workers, codec.decode_inputs, request, config)
            outputs = codec.requested_outputs(request, config) if request.outputs else None
            priority = timeout_us = None
            if request.parameters:
                priority = codec.int_parameter(request.parameters, "priority")
                timeout_us = codec.int_parameter(request.parameters, "timeout")
            deadline = request_deadline(context, timeout_us)
            infer_request = InferRequest(
                inputs=inputs,
                output_names=outputs,
                priority=priority or None,
                deadline=deadline,
            )
            result = await model.scheduler.submit(infer_request)
            encode_started = time.perf_counter_ns()
            response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id)
            codec.encode_outputs(response, result.outputs, outputs)
        except BaseException as err:
            metrics.request_raised(err, time.perf_counter_ns() - started, deadline)
            raise
        finally:
            leases.give_back()
        ended = time.perf_counter_ns()
        metrics.request_succeeded(ended - started, encode_ns=ended - encode_started)
        return response

    # The method itself, not a wrapper awaiting _infer: one coroutine fewer per request.
    ModelInfer = unary(_infer)  # type: ignore[assignment]  # same signature; mypy reads a bare Callable

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; each answer (or error) is sent as it completes."""
        async for item in self._stream(request_iterator, context):
            yield item

    async def _stream(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """The caller (streams.StreamGate) awaits each write before asking for the next answer,
        and a request holds its permit until its answer is written: at most STREAM_CONCURRENCY
        requests are in flight or answered-but-unsent, and past that no request is read, so
        a client that does not read its answers is stopped by HTTP/2 flow control, not buffered.
        ``--max-streams`` counts streams with work (idle streams cost a coroutine, are capped
        per connection, and do not keep other callers out)."""
        # (answer, whether it answers a request counted in ``pending``, None: a decoupled request's
        # answer before its last, which keeps the permit); None ends the stream.
        results: asyncio.Queue[tuple[pb.ModelStreamInferResponse, bool | None] | None] = asyncio.Queue()
        limit = asyncio.Semaphore(STREAM_CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()
        pending = 0  # requests read whose answer is not written yet; > 0: counted in self._streams

        def refused(req: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            _, message = describe(
                Overloaded(
                    f"the server has {self._streams} ModelStreamInfer streams with requests in flight, its limit "
                    "(--max-streams); retry with backoff"
                )
            )
            return _error_response(req, message)

        async def run_one(req: pb.ModelInferRequest) -> None:
            try:
                if (faced := self._faced(req)) is not None:  # one request, one or more answers
                    async for response, last in v2_faces.stream(self._faces, faced, req, context):  # type: ignore[arg-type]
                        answer = pb.ModelStreamInferResponse(infer_response=response)
                        results.put_nowait((answer, True if last else None))
                    return
                response = await self._infer(req, context)
                results.put_nowait((pb.ModelStreamInferResponse(infer_response=response), True))
            except Exception as err:  # errors travel in-band; the stream stays open
                _, message = describe(err)
                results.put_nowait((_error_response(req, message), True))

        async def read_all() -> None:
            nonlocal pending
            try:
                async for req in request_iterator:
                    await limit.acquire()
                    if pending == 0:
                        if self._streams >= self._max_streams:
                            results.put_nowait((refused(req), False))
                            continue  # the refusal holds the permit until written, like an answer
                        self._streams += 1
                    pending += 1
                    task = asyncio.create_task(run_one(req), name="ModelStreamInfer request")
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
            finally:
                results.put_nowait(None)

        reader = asyncio.create_task(read_all(), name="ModelStreamInfer reader")
        try:
            while (item := await results.get()) is not None:
                answer, counted = item
                yield answer
                if counted is None:
                    continue  # more answers of the same request follow: it keeps its permit
                # Written (the gate awaits each write): the request's permit frees, and a
                # stream left with nothing pending no longer counts against --max-streams.
                limit.release()
                if counted:
                    pending -= 1
                    if pending == 0:
                        self._streams -= 1
        finally:
            reader.cancel()
            for task in tasks:
                task.cancel()
            if pending:
                self._streams -= 1

    def _faced(self, request: pb.ModelInferRequest) -> LoadedModel | None:
        """The model of a streamed request when it has a face (its answers come from v2_faces)."""
        if self._faces is None:
            return None
        model = self._models.get(request.model_name, request.model_version)
        return model if model.config.task in FACED_TASKS and has_face(model) else None


def _error_response(req: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    return pb.ModelStreamInferResponse(
        error_message=message,
        infer_response=pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id),
    )


def _duration(message: pb.StatisticDuration, value: Duration) -> None:
    message.count = value.count
    message.ns = value.ns


def _statistics_message(model: LoadedModel) -> pb.ModelStatistics:
    s = model.metrics.snapshot()
    message = pb.ModelStatistics(
        name=model.name,
        version=model.version,
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
    )
    stats = message.inference_stats
    for name in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
        _duration(getattr(stats, name), getattr(s, name))
    for size in sorted(s.batches):
        batch = message.batch_stats.add(batch_size=size)
        _duration(batch.compute_input, s.batches[size].compute_input)
        _duration(batch.compute_infer, s.batches[size].compute_infer)
        _duration(batch.compute_output, s.batches[size].compute_output)
    return message
