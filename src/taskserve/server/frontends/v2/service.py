"""The KServe v2 operations with no wire format: what the gRPC servicer and the REST routes
both do (server and model metadata, readiness, the repository extension under
``--model-control-mode``, inference on decoded tensors). Each door decodes its messages,
calls these and encodes the answer, so both refuse the same things with the same words.
Called on the event loop only.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from taskserve.server.errors import InvalidInput, ModelControlDisabled, ModelNotReady, quoted
from taskserve.server.frontends.v2.faces import FACED_TASKS, Faces, has_face
from taskserve.server.frontends.v2.tensors import expected_shape
from taskserve.server.repository.paths import check_model_name
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.serving.manager import ModelIndexEntry, ModelManager, ModelState
from taskserve.server.tasks.base import CallOptions, batcher_of

SERVER_NAME = "taskserve"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ["model_repository", "statistics", "model_configuration", "health", "metrics"]
# Triton's platform names where one fits; torch entries are safetensors + config, not TorchScript.
PLATFORM = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan", "torch": "pytorch"}


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


def describe_model(models: ModelManager, faces: Faces | None, name: str, version: str = "") -> ModelMetadata:
    """What v2 ModelMetadata says of a model, on either door: its face's tensors where it has a
    face (generating models), its graph's otherwise."""
    model = models.get(name, version)
    config = faces.config(model) if faces is not None else model.config

    def described(specs: object) -> tuple[TensorMetadata, ...]:
        return tuple(
            TensorMetadata(t.name, t.datatype, tuple(expected_shape(config, t)))
            for t in specs or ()  # type: ignore[attr-defined]
        )

    return ModelMetadata(
        name=model.name,
        versions=tuple(models.versions(model.name)),
        platform=PLATFORM[config.platform],
        inputs=described(config.inputs),
        outputs=described(config.outputs),
    )


def int_value(parameters: Mapping[str, object], key: str) -> int | None:
    """A non-negative integer request parameter, None when absent."""
    value = parameters.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameter {key!r} must be an integer, got {str(value)[:40]!r}")
    if value < 0:
        raise InvalidInput(f"parameter {key!r} must not be negative, got {value}")
    return value


def call_options(parameters: Mapping[str, object], remaining_s: float | None = None) -> CallOptions:
    """Priority and deadline: the ``timeout`` parameter (microseconds) or the transport's
    own limit (``remaining_s``), whichever is sooner."""
    timeout_us = int_value(parameters, "timeout")
    if timeout_us:
        remaining_s = timeout_us / 1e6 if remaining_s is None else min(remaining_s, timeout_us / 1e6)
    deadline = None if remaining_s is None else time.monotonic() + remaining_s
    return CallOptions(priority=int_value(parameters, "priority") or None, deadline=deadline)


def check_model_control(model_control: str, action: str) -> None:
    if model_control != "explicit":
        raise ModelControlDisabled(
            f"model {action} is disabled: this server runs with --model-control-mode none (the repository "
            "is fixed at startup); restart it with --model-control-mode explicit to load and unload models"
        )


async def load_model(models: ModelManager, model_control: str, name: str) -> None:
    """The repository extension's load: refused unless ``--model-control-mode explicit``."""
    models.check_name(name)
    check_model_control(model_control, "load")
    if not name:
        raise InvalidInput("model_name is empty; name the model directory to load")
    check_model_name(name)
    await models.load(name)
    if not models.is_ready(name):
        reason = next((e.reason for e in models.index() if e.name == name), "")
        raise ModelNotReady(f"model {quoted(name)} failed to load: {reason}")


async def unload_model(models: ModelManager, model_control: str, name: str) -> None:
    models.check_name(name)
    check_model_control(model_control, "unload")
    await models.unload(name)


class V2Service:
    """The v2 operations over the shared model manager and faces."""

    def __init__(
        self,
        models: ModelManager,
        faces: Faces,
        ready: Callable[[], bool],
        model_control: str = "none",
        protocol: str = "grpc",
    ) -> None:
        self.models = models
        # The door, as the metrics label it (grpc, http).
        self.protocol = protocol
        self.faces = faces
        # True when the server as a whole takes traffic (startup done, not draining).
        self._ready = ready
        # "explicit": load and unload allowed; "none": the repository is fixed at startup.
        self._model_control = model_control

    def server_ready(self) -> bool:
        return bool(self._ready())

    def model_ready(self, name: str, version: str = "") -> bool:
        return self.models.is_ready(name, version)

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The served version; ModelNotFound / ModelNotReady otherwise."""
        return self.models.get(name, version)

    def model_metadata(self, name: str, version: str = "") -> ModelMetadata:
        return describe_model(self.models, self.faces, name, version)

    def index(self, ready_only: bool = False) -> list[ModelIndexEntry]:
        return [e for e in self.models.index() if not ready_only or e.state == ModelState.READY]

    async def load(self, name: str) -> None:
        await load_model(self.models, self._model_control, name)

    async def unload(self, name: str) -> None:
        await unload_model(self.models, self._model_control, name)

    async def infer(
        self,
        model: LoadedModel,
        tensors: dict[str, np.ndarray],
        outputs: Sequence[str] | None,
        parameters: Mapping[str, object],
        options: CallOptions,
    ) -> dict[str, np.ndarray]:
        """Decoded, checked input tensors in; the output tensors (``outputs``, or all) out.
        The request holds a lease on the version: a swap lets it finish."""
        with model.leases.hold():
            if model.config.task in FACED_TASKS and has_face(model):
                with (
                    model.metrics.track_request(time.perf_counter_ns(), options.deadline, self.protocol),
                    self.faces.tasks.context.admit(),
                ):
                    result = await self.faces.infer(model, tensors, parameters, options)
            else:
                wanted = tuple(outputs) if outputs else None
                request = InferRequest(
                    inputs=tensors, output_names=wanted, priority=options.priority, deadline=options.deadline
                )
                with model.metrics.track_request(time.perf_counter_ns(), options.deadline, self.protocol):
                    result = (await batcher_of(model).submit(request)).outputs
        if outputs:
            return {name: result[name] for name in outputs}
        return result

    async def stream(
        self, model: LoadedModel, tensors: dict[str, np.ndarray], parameters: Mapping[str, object],
        options: CallOptions,
    ) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool], None]:  # fmt: skip
        """(outputs, last) per response of a generating model on a streaming door."""
        started = time.perf_counter_ns()
        with (
            model.leases.hold(),
            model.metrics.track_request(started, options.deadline, self.protocol),
            self.faces.tasks.context.admit(),
        ):
            responses = self.faces.stream(model, tensors, parameters, options)
            first = True
            try:
                async for item in responses:
                    if first:
                        model.metrics.first_chunk(self.protocol, (time.perf_counter_ns() - started) / 1e9)
                        first = False
                    yield item
            finally:
                await responses.aclose()
