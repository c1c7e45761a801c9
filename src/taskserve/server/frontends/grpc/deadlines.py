"""A request's deadline as the server tracks it: the earlier of the caller's gRPC deadline and
the request's own timeout field, shared by the v2 servicer and the typed task servicers."""

from __future__ import annotations

import time
from typing import Any

import grpc.aio


def request_deadline(context: grpc.aio.ServicerContext[Any, Any], timeout_us: int | None) -> float | None:
    """The earlier of the gRPC deadline and the request's own timeout, as monotonic time."""
    remaining = context.time_remaining()
    if timeout_us:
        remaining = timeout_us / 1e6 if remaining is None else min(remaining, timeout_us / 1e6)
    return None if remaining is None else time.monotonic() + remaining
