"""What every HTTP handler does around its task, as the gRPC door's ``TaskServicer.call``
does: find the model and its task object (through the shared task cache), admit the
request, and count it in the model's metrics under the ``http`` protocol."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fastapi import Request

from taskserve.server.errors import Cancelled, InvalidInput
from taskserve.server.frontends.http.errors import HttpError
from taskserve.server.frontends.parts import ServingParts
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.tasks.base import CallOptions, Task

TaskT = TypeVar("TaskT", bound=Task)
T = TypeVar("T")
PROTOCOL = "http"


@dataclass(frozen=True)
class Call(Generic[TaskT]):
    model: LoadedModel
    task: TaskT
    options: CallOptions


@asynccontextmanager
async def task_call(parts: ServingParts, name: str, cls: type[TaskT]) -> AsyncIterator[Call[TaskT]]:
    """The model ``name``'s ``cls`` task, admitted and tracked for the body of the block.
    A streaming handler keeps the block open over its whole stream."""
    if not name:
        raise InvalidInput("model is empty; name the model to use (GET /v1/models lists them)")
    model = parts.models.get(name)
    started = time.perf_counter_ns()
    with model.metrics.track_request(started, protocol=PROTOCOL), parts.tasks.context.admit():
        task = await parts.tasks.get(model, cls)
        yield Call(model, task, CallOptions(first_chunk=model.metrics.first_chunk_timer(PROTOCOL, started)))


async def read_json(request: Request) -> dict[str, Any]:
    """The body as a JSON object (read under the edge guard's size cap)."""
    body = await request.body()
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HttpError(400, f"the body is not valid JSON ({err.__class__.__name__}: {str(err)[:120]})") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    return value


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, or its cancellation when the client goes away first: an unstreamed
    generation whose caller left must not keep its slot until the last token (the gRPC door
    gets this from the call's cancellation). Call after the body has been read."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise Cancelled("the client disconnected before the answer was ready")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
