"""The taskserve Python client: typed task calls and the KServe v2 protocol, sync and asyncio.

Needs only grpcio, protobuf and numpy (Pillow only to pass PIL images or decode masks).
The asyncio client (``_async/``) is written by hand; the blocking one (``_sync/``) is
generated from it by tools/generate_sync_client.py (``make clients``).
"""

from taskserve.clients._async.client import AsyncTaskServeClient
from taskserve.clients._sync.client import TaskServeClient
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
