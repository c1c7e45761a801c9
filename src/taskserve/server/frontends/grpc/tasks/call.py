"""What every typed RPC does around its task: find the model and its task object,
admit the request, turn RequestOptions into scheduling hints, record metrics."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from taskserve.protocol.generated.taskserve.v1 import common_pb2
from taskserve.server.errors import InvalidInput, WrongTask
from taskserve.server.frontends.grpc.deadlines import request_deadline
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.serving.manager import ModelManager
from taskserve.server.tasks.base import CallOptions, Task, TaskCache
from taskserve.server.tasks.images import ImageSource, RawImage

Context = grpc.aio.ServicerContext[Any, Any]
TaskT = TypeVar("TaskT", bound=Task)


@dataclass(frozen=True)
class Call(Generic[TaskT]):
    """One typed request's model, task object and scheduling hints."""

    model: LoadedModel
    task: TaskT
    options: CallOptions

    @property
    def served_by(self) -> common_pb2.ServedBy:
        return common_pb2.ServedBy(name=self.model.name, version=self.model.version)


class TaskServicer:
    """Base of the typed servicers: shared model lookup and bookkeeping."""

    def __init__(self, models: ModelManager, tasks: TaskCache) -> None:
        self._models = models
        self._tasks = tasks

    @asynccontextmanager
    async def call(
        self,
        ref: common_pb2.ModelRef,
        cls: type[TaskT] | tuple[type[TaskT], ...],
        options: common_pb2.RequestOptions,
        context: Context,
    ) -> AsyncIterator[Call[TaskT]]:
        """``cls``: the task class, or several when the service runs on models of
        several tasks (the one matching the model's config is used)."""
        if not ref.name:
            raise InvalidInput("model.name is empty; name the model to use")
        model = self._models.get(ref.name, ref.version)
        # Leased in the lookup's step, until the answer is built: a reload that swaps this
        # version out meanwhile lets it finish this request instead of refusing it.
        with model.leases.hold():
            if isinstance(cls, tuple):
                cls = _matching(model, cls)
            deadline = request_deadline(context, options.timeout_us or None)
            started = time.perf_counter_ns()
            with model.metrics.track_request(started, deadline), self._tasks.context.admit():
                task = await self._tasks.get(model, cls)
                first_chunk = model.metrics.first_chunk_timer("grpc", started)
                hints = CallOptions(priority=options.priority or None, deadline=deadline, first_chunk=first_chunk)
                yield Call(model, task, hints)


def _matching(model: LoadedModel, classes: tuple[type[TaskT], ...]) -> type[TaskT]:
    for cls in classes:
        if cls.task == model.config.task:
            return cls
    raise WrongTask(
        f"model {model.name!r} serves task {model.config.task!r}; this service needs one of "
        f"{[c.task for c in classes]}"
    )


def image_source(image: common_pb2.Image, what: str) -> ImageSource:
    """A proto Image as the task layer's encoded bytes or RawImage."""
    kind = image.WhichOneof("source")
    if kind == "encoded":
        return image.encoded
    if kind == "raw":
        raw = image.raw
        return RawImage(height=raw.height, width=raw.width, channels=raw.channels, data=raw.data)
    raise InvalidInput(f"{what} is empty; set encoded (JPEG, PNG, WebP bytes) or raw")


def image_sources(images: Any) -> list[ImageSource]:
    return [image_source(image, f"images[{i}]") for i, image in enumerate(images)]


def label_scores(scores: Any) -> common_pb2.Classification:
    return common_pb2.Classification(
        labels=[common_pb2.LabelScore(label=s.label, score=s.score, index=s.index) for s in scores]
    )


def optional_bool(message: Any, field: str) -> bool | None:
    """A proto3 ``optional bool``: None when the caller left it unset."""
    return bool(getattr(message, field)) if message.HasField(field) else None
