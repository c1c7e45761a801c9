"""Requests and results of ``taskserve.v1.Translation``, ``Summarization`` and
``Text2Text``: protobuf <-> client types. Shared by the sync and asyncio text namespaces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from taskserve.clients.generation_codec import check_decoding, chunk
from taskserve.clients.results import Generation, GenerationChunk
from taskserve.clients.text_codec import model_ref, request_options
from taskserve.protocol.generated.taskserve.v1 import text_transform_pb2


def decoding(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None, stop: Sequence[str]
) -> text_transform_pb2.DecodingOptions:
    """Checks what the client can check; the server checks the rest (limits, lengths)."""
    check_decoding(max_new_tokens, temperature, top_k, top_p, seed, stop)
    return text_transform_pb2.DecodingOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=list(stop)
    )


def transform_chunk(response: text_transform_pb2.TransformResponse) -> GenerationChunk:
    return chunk(response)


def transform_result(response: text_transform_pb2.TransformResponse) -> Generation:
    piece = transform_chunk(response)
    if piece.finish_reason is None or piece.usage is None or piece.served_by is None:
        raise RuntimeError("the transform response lacks its finish reason or usage")
    return Generation(piece.text, piece.token_ids, piece.finish_reason, piece.usage, piece.served_by)


def request(
    cls: Any, text: str, model: str, version: str, priority: int, queue_timeout_us: int,
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None, stop: Sequence[str],
    **extra: str,
) -> Any:  # fmt: skip
    """One transform request from a client method's arguments (sync and asyncio alike)."""
    if not isinstance(text, str):
        raise TypeError("text must be a string")
    return cls(
        model=model_ref(model, version), options=request_options(priority, queue_timeout_us), text=text,
        decoding=decoding(max_new_tokens, temperature, top_k, top_p, seed, stop), **extra,
    )  # fmt: skip
