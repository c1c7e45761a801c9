"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/images/generations``.

Thin codecs, like the typed gRPC servicers: the JSON body becomes the task's own parameters
(openai_schema.py), the same task object (from the shared cache, through the same batchers
and generation engine) does the work, and its result becomes OpenAI's JSON or server-sent
events. Chat goes through the model's chat template exactly as TextGeneration's ``messages``
do, so the same greedy request gives the same text through either door.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from taskserve.server.frontends.http.call import task_call, unless_disconnected
from taskserve.server.frontends.http.errors import describe, openai_error_body
from taskserve.server.frontends.http.openai_schema import (
    FINISH_REASONS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ImageGenerationRequest,
    unsupported,
)
from taskserve.server.frontends.http.sse import DONE, EventStream, event
from taskserve.server.frontends.parts import ServingParts
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.diffusion.pipeline import Mode
from taskserve.server.tasks.image_generation import GeneratedImages, ImageGenerator, ImageRequest, OutputFormat
from taskserve.server.tasks.sentence_embedding import EmbedParams, SentenceEmbedder
from taskserve.server.tasks.text_generation import GenerateParams, GenerationChunk, TextGenerator

# Denoising steps when a request names none (OpenAI's API has no such field).
DEFAULT_IMAGE_STEPS = 25


def build_router(parts: ServingParts) -> APIRouter:
    router = APIRouter(prefix="/v1")
    write_timeout = parts.settings.stream_write_timeout_s

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "taskserve"}
            for name in parts.models.model_names()
            if parts.models.is_ready(name)
        ]
        return {"object": "list", "data": data}

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | EventStream:
        messages, params = body.params()
        chunks = _generation(parts, body.model, "", messages, params)
        ids = _Ids("chatcmpl", "chat.completion", body.model)
        if body.stream:
            first = await anext(chunks)  # refusals before the first token leave as a status, not a 200
            return EventStream(_chat_events(ids, first, chunks, body.include_usage), write_timeout, _error_event)
        text, last = await unless_disconnected(request, _collect(chunks))
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None}
        return JSONResponse(ids.body([{**choice, "finish_reason": _finish(last)}], _usage(last)))

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | EventStream:
        prompt, params = body.params()
        chunks = _generation(parts, body.model, prompt, (), params)
        ids = _Ids("cmpl", "text_completion", body.model)
        if body.stream:
            first = await anext(chunks)
            return EventStream(_completion_events(ids, first, chunks, body.include_usage), write_timeout, _error_event)
        text, last = await unless_disconnected(request, _collect(chunks))
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(last)}
        return JSONResponse(ids.body([choice], _usage(last)))

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict[str, Any]:
        texts = body.texts()
        async with task_call(parts, body.model, SentenceEmbedder) as call:
            vectors, tokens = await call.task.embed_counted(texts, EmbedParams(), call.options, what="input")
        if body.dimensions is not None and body.dimensions != vectors.shape[1]:
            # Checked after: the dimension is the model's output's, known for sure only now.
            raise _dimensions(body.dimensions, vectors.shape[1], body.model)
        encode: Callable[[np.ndarray], Any] = _base64 if body.encoding_format == "base64" else _floats
        data = [{"object": "embedding", "index": i, "embedding": encode(row)} for i, row in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": body.model, "usage": usage}

    @router.post("/images/generations")
    async def images(body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
        body.check_formats()
        width, height = body.size_pixels()
        result = await unless_disconnected(request, _images(parts, body, width, height))
        return {
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode("ascii")} for png in result.images],
            "size": f"{result.width}x{result.height}",
            "output_format": "png",
        }

    return router


async def _generation(
    parts: ServingParts, model: str, prompt: str, messages: Sequence[ChatMessage], params: GenerateParams
) -> AsyncIterator[GenerationChunk]:
    """The task's chunks, admitted and counted for as long as the caller iterates."""
    async with task_call(parts, model, TextGenerator) as call:
        async for chunk in call.task.generate(prompt, messages, params, call.options):
            yield chunk


async def _images(parts: ServingParts, body: ImageGenerationRequest, width: int, height: int) -> GeneratedImages:
    async with task_call(parts, body.model, ImageGenerator) as call:
        request = ImageRequest(
            mode=Mode.TEXT_TO_IMAGE, prompt=body.prompt, negative_prompt=body.negative_prompt,
            width=width, height=height, steps=body.steps or min(DEFAULT_IMAGE_STEPS, call.task.max_steps),
            guidance_scale=body.guidance_scale, seed=body.seed, num_images=body.n, output_format=OutputFormat.PNG,
        )  # fmt: skip
        return await call.task.run(request, call.options)


async def _collect(chunks: AsyncIterator[GenerationChunk]) -> tuple[str, GenerationChunk]:
    texts: list[str] = []
    last: GenerationChunk | None = None
    async for chunk in chunks:
        texts.append(chunk.text)
        last = chunk
    assert last is not None and last.finish_reason is not None  # the task always ends with a finished chunk
    return "".join(texts), last


def _finish(chunk: GenerationChunk) -> str | None:
    return FINISH_REASONS[chunk.finish_reason] if chunk.finish_reason is not None else None


def _usage(chunk: GenerationChunk) -> dict[str, int] | None:
    if chunk.usage is None:
        return None
    prompt, generated = chunk.usage.prompt_tokens, chunk.usage.generated_tokens
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


class _Ids:
    """The id, object type, creation time and model every body of one response repeats."""

    def __init__(self, prefix: str, kind: str, model: str) -> None:
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.kind = kind
        self.created = int(time.time())
        self.model = model

    def body(self, choices: list[dict[str, Any]], usage: dict[str, int] | None, chunk: bool = False) -> dict[str, Any]:
        kind = f"{self.kind}.chunk" if chunk and self.kind == "chat.completion" else self.kind
        body: dict[str, Any] = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        body["choices"] = choices
        if usage is not None or not chunk:
            body["usage"] = usage
        return body


async def _chat_events(
    ids: _Ids, first: GenerationChunk, rest: AsyncIterator[GenerationChunk], include_usage: bool
) -> AsyncIterator[bytes]:
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    yield event(ids.body([role], None, chunk=True))
    last = first
    async for chunk in _chain(first, rest):
        last = chunk
        delta = {"content": chunk.text} if chunk.text else {}
        if delta or chunk.finish_reason is not None:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": _finish(chunk)}
            yield event(ids.body([choice], None, chunk=True))
    if include_usage:
        yield event(ids.body([], _usage(last), chunk=True))
    yield DONE


async def _completion_events(
    ids: _Ids, first: GenerationChunk, rest: AsyncIterator[GenerationChunk], include_usage: bool
) -> AsyncIterator[bytes]:
    last = first
    async for chunk in _chain(first, rest):
        last = chunk
        if chunk.text or chunk.finish_reason is not None:
            choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": _finish(chunk)}
            yield event(ids.body([choice], None, chunk=True))
    if include_usage:
        yield event(ids.body([], _usage(last), chunk=True))
    yield DONE


async def _chain(first: GenerationChunk, rest: AsyncIterator[GenerationChunk]) -> AsyncIterator[GenerationChunk]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


def _error_event(err: BaseException) -> bytes:
    """An error after the stream began: OpenAI's error body as the last event (vLLM does the same)."""
    return event(openai_error_body(describe(err)))


def _floats(row: np.ndarray) -> list[float]:
    values: list[float] = row.astype(np.float32).tolist()
    return values


def _base64(row: np.ndarray) -> str:
    """Little-endian float32 bytes, base64: what OpenAI's SDKs decode (numpy frombuffer float32)."""
    return base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")


def _dimensions(asked: int, actual: int, model: str) -> Exception:
    return unsupported(
        "dimensions", f"dimensions={asked}: model {model!r} returns {actual}-dimensional embeddings; leave it out"
    )
