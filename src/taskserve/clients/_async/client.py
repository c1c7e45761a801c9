"""``AsyncTaskServeClient``: the asyncio client for the v2 protocol and the typed task services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt

from taskserve.clients._async.calls import AsyncCaller
from taskserve.clients._async.image_generation import AsyncImageGenerationNamespace
from taskserve.clients._async.text import AsyncTextNamespace
from taskserve.clients._async.vision import AsyncVisionNamespace
from taskserve.clients.channel import create_aio_channel
from taskserve.clients.errors import TaskServeError, Unavailable, error_for
from taskserve.clients.metadata import ModelMetadata, ServerMetadata
from taskserve.clients.options import ClientOptions
from taskserve.clients.v2_codec import ParameterValue, decode_infer_response, encode_infer_request
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc


class AsyncTaskServeClient:
    """The asyncio client; create it inside the event loop that uses it.

    >>> async with AsyncTaskServeClient("localhost:8001") as client:
    ...     vectors = await client.text.embed(["hello"], model="minilm")
    """

    def __init__(
        self, target: str, options: ClientOptions | None = None, *, channel: grpc.aio.Channel | None = None
    ) -> None:
        self.options = options or ClientOptions()
        self.channel = channel if channel is not None else create_aio_channel(target, self.options)
        self._caller = AsyncCaller(self.options)
        self._v2 = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.text = AsyncTextNamespace(self.channel, self._caller)
        self.vision = AsyncVisionNamespace(self.channel, self._caller)
        self.image_generation = AsyncImageGenerationNamespace(self.channel, self._caller)

    # -- health and metadata (v2) --------------------------------------------------

    async def server_live(self, *, timeout: float | None = None) -> bool:
        return (await self._caller.unary(self._v2.ServerLive, pb.ServerLiveRequest(), timeout)).live

    async def server_ready(self, *, timeout: float | None = None) -> bool:
        return (await self._caller.unary(self._v2.ServerReady, pb.ServerReadyRequest(), timeout)).ready

    async def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        return (await self._caller.unary(self._v2.ModelReady, request, timeout)).ready

    async def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        response = await self._caller.unary(self._v2.ServerMetadata, pb.ServerMetadataRequest(), timeout)
        return ServerMetadata.from_proto(response)

    async def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        return ModelMetadata.from_proto(await self._caller.unary(self._v2.ModelMetadata, request, timeout))

    async def wait_until_ready(self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Wait until the server (or ``model``) reports ready; DeadlineExceeded after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: TaskServeError | None = None
        while time.monotonic() < deadline:
            remaining = max(deadline - time.monotonic(), 0.01)
            try:
                if await (
                    self.model_ready(model, timeout=remaining) if model else self.server_ready(timeout=remaining)
                ):
                    return
            except Unavailable as err:  # not listening yet
                last = err
            await asyncio.sleep(interval)
        what = f"model {model!r}" if model else "server"
        detail = f" (last error: {last.message})" if last else ""
        raise error_for(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} not ready after {timeout}s{detail}")

    # -- inference (v2) ------------------------------------------------------------

    async def infer(
        self,
        model: str,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        version: str = "",
        outputs: Sequence[str] | None = None,
        request_id: str = "",
        priority: int | None = None,
        queue_timeout_us: int | None = None,
        parameters: Mapping[str, ParameterValue] | None = None,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a v2 inference: input name -> array in, output name -> array out.

        ``outputs`` restricts which outputs come back (None: all); ``priority`` and
        ``queue_timeout_us`` are the batcher's request parameters; ``timeout`` is the
        call's deadline in seconds."""
        request = encode_infer_request(
            model, inputs, model_version=version, outputs=outputs, request_id=request_id,
            priority=priority, queue_timeout_us=queue_timeout_us, parameters=parameters,
        )  # fmt: skip
        return decode_infer_response(await self._caller.unary(self._v2.ModelInfer, request, timeout))

    # -- lifecycle -------------------------------------------------------------------

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
