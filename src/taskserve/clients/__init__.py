"""The taskserve Python client: typed task calls and the KServe v2 protocol, sync and asyncio.

Needs only grpcio, protobuf and numpy (Pillow only to pass PIL images or decode masks).
"""

from taskserve.clients.async_client import AsyncTaskServeClient
from taskserve.clients.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TaskServeError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from taskserve.clients.metadata import ModelMetadata, ServerMetadata, TensorMetadata
from taskserve.clients.options import ClientOptions, RetryPolicy, TlsConfig
from taskserve.clients.sync_client import TaskServeClient

__all__ = [
    "AsyncTaskServeClient",
    "Cancelled",
    "ClientOptions",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "ModelMetadata",
    "NotFound",
    "ResourceExhausted",
    "RetryPolicy",
    "ServerMetadata",
    "TaskServeClient",
    "TaskServeError",
    "TensorMetadata",
    "TlsConfig",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
