"""KServe v2 REST (Open Inference Protocol over HTTP): ``/v2``, ``/v2/health/live|ready``,
``/v2/models/{m}[/versions/{v}]``, ``/ready``, ``/config``, ``/infer`` (JSON tensors and the
binary tensor data extension), the repository extension and the generate extension
(``/generate``, ``/generate_stream``).

The v2 REST routes go here (the ``v2-generation`` branch fills them in); errors raised by
the handlers leave as KServe's ``{"error": "<message>"}`` body (http/errors.py).
"""

from __future__ import annotations

from fastapi import APIRouter

from taskserve.server.frontends.parts import ServingParts


def build_router(parts: ServingParts) -> APIRouter:
    """The v2 REST routes over ``parts`` (shared with the gRPC door)."""
    router = APIRouter()
    return router
