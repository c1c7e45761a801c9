"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/images/generations``. Thin codecs: JSON in, the tasks' own request
types, the same task objects (through the same batchers and engine) as the typed gRPC services,
JSON or server-sent events out."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from taskserve.server.frontends.parts import ServingParts


def build_router(parts: ServingParts) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "taskserve"}
            for name in parts.models.model_names()
            if parts.models.is_ready(name)
        ]
        return {"object": "list", "data": data}

    return router
