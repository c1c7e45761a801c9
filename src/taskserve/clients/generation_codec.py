"""Requests and results of ``taskserve.v1.TextGeneration``: protobuf <-> client types.

Shared by the sync and asyncio text namespaces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from taskserve.clients.results import (
    ChatMessage,
    FinishReason,
    Generation,
    GenerationChunk,
    GenerationUsage,
    ServedBy,
)
from taskserve.protocol.generated.taskserve.v1 import common_pb2, text_generation_pb2, text_transform_pb2

Message = ChatMessage | Mapping[str, str]

_FINISH: dict[int, FinishReason] = {
    text_generation_pb2.FINISH_REASON_LENGTH: "length",
    text_generation_pb2.FINISH_REASON_STOP: "stop",
    text_generation_pb2.FINISH_REASON_EOS: "eos",
}


def _message(message: Message, i: int) -> text_generation_pb2.ChatMessage:
    if isinstance(message, ChatMessage):
        return text_generation_pb2.ChatMessage(role=message.role, content=message.content)
    if isinstance(message, Mapping) and "role" in message and "content" in message:
        return text_generation_pb2.ChatMessage(role=message["role"], content=message["content"])
    raise TypeError(f"messages[{i}] must be a ChatMessage or a mapping with 'role' and 'content'")


def check_decoding(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None, stop: Sequence[str]
) -> None:
    """The decoding settings' client-side checks, shared by generation and the transforms."""
    if isinstance(stop, str):
        raise TypeError("stop must be a list of strings, even for one stop string")
    if max_new_tokens < 0 or top_k < 0 or temperature < 0:
        raise ValueError("max_new_tokens, top_k and temperature must be >= 0")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")


def generate_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    prompt: str | None,
    messages: Sequence[Message] | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    stop: Sequence[str],
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> text_generation_pb2.GenerateRequest:
    """Checks what the client can check; the server checks the rest (limits, lengths)."""
    if (prompt is None) == (messages is None):
        raise ValueError("pass either prompt or messages")
    check_decoding(max_new_tokens, temperature, top_k, top_p, seed, stop)
    if not 0 < repetition_penalty <= 10:
        raise ValueError(f"repetition_penalty must be in (0, 10] (1: none), got {repetition_penalty}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2 <= value <= 2:
            raise ValueError(f"{name} must be in [-2, 2] (0: none), got {value}")
    return text_generation_pb2.GenerateRequest(
        model=ref, options=opts, prompt=prompt or "",
        messages=[_message(m, i) for i, m in enumerate(messages or ())],
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
        stop=list(stop), repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
    )  # fmt: skip


def chunk(response: text_generation_pb2.GenerateResponse | text_transform_pb2.TransformResponse) -> GenerationChunk:
    """A streamed message (the transform services' responses have the same fields)."""
    usage = (
        GenerationUsage(response.usage.prompt_tokens, response.usage.generated_tokens)
        if response.HasField("usage")
        else None
    )
    return GenerationChunk(
        text=response.text,
        token_ids=tuple(response.token_ids),
        finish_reason=_FINISH.get(response.finish_reason),
        usage=usage,
        served_by=ServedBy(response.model.name, response.model.version) if response.HasField("model") else None,
    )


class GenerationCollector:
    """Joins streamed chunks into one ``Generation``."""

    def __init__(self) -> None:
        self._texts: list[str] = []
        self._ids: list[int] = []
        self._last: GenerationChunk | None = None

    def add(self, piece: GenerationChunk) -> None:
        self._texts.append(piece.text)
        self._ids.extend(piece.token_ids)
        self._last = piece

    def result(self) -> Generation:
        last = self._last
        if last is None or last.finish_reason is None or last.usage is None or last.served_by is None:
            raise RuntimeError("the generation stream ended without its final message")
        return Generation("".join(self._texts), tuple(self._ids), last.finish_reason, last.usage, last.served_by)
