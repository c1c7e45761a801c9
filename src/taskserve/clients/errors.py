"""Typed client exceptions: one class per gRPC status a caller may want to handle.

Every failed call surfaces as a ``TaskServeError`` carrying the gRPC status code
and the server's message, so callers never need to import grpc to tell an
overloaded server (retry later) from a bad request (fix the input).
"""

from __future__ import annotations

import grpc
import grpc.aio


class TaskServeError(Exception):
    """A call failed. ``code`` is the gRPC status, ``message`` the server's text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class InvalidArgument(TaskServeError):
    """The request was malformed (bad shape, datatype, missing input): fix it, do not retry."""


class NotFound(TaskServeError):
    """No such model or version."""


class FailedPrecondition(TaskServeError):
    """The model exists but cannot serve this call (e.g. a typed service for another task)."""


class Unavailable(TaskServeError):
    """Server or model not reachable or not ready; the channel already retried with backoff."""


class ResourceExhausted(TaskServeError):
    """The server's queue is full (admission control) or a message exceeded a size limit."""


class DeadlineExceeded(TaskServeError):
    """The call's deadline passed before the answer arrived."""


class Cancelled(TaskServeError):
    """The call was cancelled."""


class Unimplemented(TaskServeError):
    """The server does not offer this RPC (e.g. a typed service a v2-only server lacks)."""


class Internal(TaskServeError):
    """The server failed while handling the call."""


class Unauthenticated(TaskServeError):
    """The server wants a bearer token this call lacked (or did not accept): set
    ``ClientOptions(metadata=(("authorization", "Bearer <token>"),))``; retrying will not help."""


_BY_CODE: dict[grpc.StatusCode, type[TaskServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.UNIMPLEMENTED: Unimplemented,
    grpc.StatusCode.INTERNAL: Internal,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_for(code: grpc.StatusCode, message: str) -> TaskServeError:
    """The exception instance for a status code (unlisted codes give the base class)."""
    return _BY_CODE.get(code, TaskServeError)(code, message)


def from_rpc_error(err: grpc.RpcError) -> TaskServeError:
    """Convert what grpc raised (sync or asyncio flavour) into a typed error."""
    if isinstance(err, (grpc.Call, grpc.aio.AioRpcError)):
        return error_for(err.code(), err.details() or "")
    return TaskServeError(grpc.StatusCode.UNKNOWN, str(err))
