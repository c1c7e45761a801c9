"""``TaskServeClient``: the blocking client for the v2 protocol and the typed task services."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Self

import grpc
import numpy as np
import numpy.typing as npt

from taskserve.clients.calls import SyncCaller
from taskserve.clients.channel import create_channel
from taskserve.clients.errors import TaskServeError, Unavailable, error_for
from taskserve.clients.image_generation import ImageGenerationNamespace
from taskserve.clients.metadata import ModelMetadata, ServerMetadata
from taskserve.clients.options import ClientOptions
from taskserve.clients.text import TextNamespace
from taskserve.clients.v2_codec import ParameterValue, decode_infer_response, encode_infer_request
from taskserve.clients.vision import VisionNamespace
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc


class TaskServeClient:
    """Blocking client. One instance (one channel) per process is enough: it is
    thread-safe and multiplexes calls over HTTP/2.

    >>> with TaskServeClient("localhost:8001") as client:
    ...     client.text.embed(["hello"], model="minilm").shape
    """

    def __init__(self, target: str, options: ClientOptions | None = None, *, channel: grpc.Channel | None = None):
        self.options = options or ClientOptions()
        self.channel = channel if channel is not None else create_channel(target, self.options)
        self._caller = SyncCaller(self.options)
        self._v2 = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.text = TextNamespace(self.channel, self._caller)
        self.vision = VisionNamespace(self.channel, self._caller)
        self.image_generation = ImageGenerationNamespace(self.channel, self._caller)

    # -- health and metadata (v2) --------------------------------------------------

    def server_live(self, *, timeout: float | None = None) -> bool:
        return self._caller.unary(self._v2.ServerLive, pb.ServerLiveRequest(), timeout).live

    def server_ready(self, *, timeout: float | None = None) -> bool:
        return self._caller.unary(self._v2.ServerReady, pb.ServerReadyRequest(), timeout).ready

    def model_ready(self, model: str, version: str = "", *, timeout: float | None = None) -> bool:
        request = pb.ModelReadyRequest(name=model, version=version)
        return self._caller.unary(self._v2.ModelReady, request, timeout).ready

    def server_metadata(self, *, timeout: float | None = None) -> ServerMetadata:
        return ServerMetadata.from_proto(
            self._caller.unary(self._v2.ServerMetadata, pb.ServerMetadataRequest(), timeout)
        )

    def model_metadata(self, model: str, version: str = "", *, timeout: float | None = None) -> ModelMetadata:
        request = pb.ModelMetadataRequest(name=model, version=version)
        return ModelMetadata.from_proto(self._caller.unary(self._v2.ModelMetadata, request, timeout))

    def wait_until_ready(self, model: str | None = None, *, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Block until the server (or ``model``) reports ready; DeadlineExceeded after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: TaskServeError | None = None
        while time.monotonic() < deadline:
            remaining = max(deadline - time.monotonic(), 0.01)
            try:
                ready = self.model_ready(model, timeout=remaining) if model else self.server_ready(timeout=remaining)
                if ready:
                    return
            except Unavailable as err:  # not listening yet
                last = err
            time.sleep(interval)
        what = f"model {model!r}" if model else "server"
        detail = f" (last error: {last.message})" if last else ""
        raise error_for(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} not ready after {timeout}s{detail}")

    # -- inference (v2) ------------------------------------------------------------

    def infer(
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
        return decode_infer_response(self._caller.unary(self._v2.ModelInfer, request, timeout))

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
