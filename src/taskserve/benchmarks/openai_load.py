"""One asyncio load client for every OpenAI-compatible completions server (taskserve's HTTP
door, llama.cpp's server, vLLM's): streamed ``/v1/completions`` requests, timed per event.

Each request opens its own connection (``Connection: close``): llama.cpp's server closes a
streamed keep-alive connection after the stream, and a client that reused it would see
spurious failures on that server alone. Every server therefore pays the same connection cost.

What a request records: when the first text arrived (TTFT), the gaps between later text
events (inter-token latency: servers send one event per token, taskserve holds a token that
ends mid-character or may start a stop string and sends it with the next), and the server's
own ``usage`` counts, so equal work (same prompt tokens, same generated tokens) is checked
rather than assumed.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

DONE = "[DONE]"


@dataclass(frozen=True)
class Completion:
    """One streamed request. Counts are -1 when the server did not report them."""

    prompt_tokens: int
    generated: int
    ttft_s: float
    gaps_s: tuple[float, ...]
    total_s: float
    error: str | None = None
    finish_reason: str | None = None


def completion_body(
    model: str, prompt: str | Sequence[int], new_tokens: int, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A greedy streamed completion of exactly what ``prompt`` says (text, or token ids where
    the server takes them); ``extra`` holds a server's own fields (ignore_eos, cache_prompt)."""
    return {
        "model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt), "max_tokens": new_tokens,
        "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **(extra or {}),
    }  # fmt: skip


def sse_data(line: str) -> str | None:
    """The payload of a server-sent ``data:`` line; None for blank lines, comments and other fields."""
    if not line.startswith("data:"):
        return None
    return line[5:].strip()


class StreamParseError(Exception):
    """The server sent an error event or something that is not a completion chunk."""


@dataclass
class StreamState:
    """What the events of one stream said so far (fed one payload at a time)."""

    text_events: list[float] = field(default_factory=list)  # arrival times of events carrying text
    prompt_tokens: int = -1
    generated: int = -1
    finish_reason: str | None = None
    done: bool = False

    def feed(self, payload: str, now: float) -> None:
        if payload == DONE:
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except json.JSONDecodeError:
            raise StreamParseError(f"not JSON: {payload[:120]!r}") from None
        if not isinstance(chunk, dict):
            raise StreamParseError(f"not a completion chunk: {payload[:120]!r}")
        if chunk.get("error"):
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise StreamParseError(f"error event: {str(message)[:200]}")
        for choice in chunk.get("choices") or ():
            text = choice.get("text")
            if text is None:  # a chat chunk
                text = (choice.get("delta") or {}).get("content")
            if text:
                self.text_events.append(now)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens", -1))
            self.generated = int(usage.get("completion_tokens", -1))

    def completion(self, started: float, ended: float) -> Completion:
        events = self.text_events
        ttft = events[0] - started if events else 0.0
        gaps = tuple(b - a for a, b in zip(events, events[1:], strict=False))
        return Completion(self.prompt_tokens, self.generated, ttft, gaps, ended - started, None, self.finish_reason)


async def stream_completion(client: httpx.AsyncClient, url: str, body: Mapping[str, Any]) -> Completion:
    """One request; failures become a Completion with ``error`` set, never an exception."""
    started = time.perf_counter()
    state = StreamState()
    try:
        async with client.stream("POST", url, json=body, headers={"Connection": "close"}) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise StreamParseError(f"HTTP {response.status_code}: {text[:200]}")
            async for line in response.aiter_lines():
                payload = sse_data(line)
                if payload is not None:
                    state.feed(payload, time.perf_counter())
        if not state.done:
            raise StreamParseError("the stream ended without [DONE]")
    except (httpx.HTTPError, StreamParseError) as err:
        return Completion(-1, -1, 0.0, (), time.perf_counter() - started, f"{type(err).__name__}: {err}")
    return state.completion(started, time.perf_counter())


async def run_streams(
    url: str, bodies: Sequence[Mapping[str, Any]], streams: int, timeout_s: float
) -> tuple[float, list[Completion]]:
    """``bodies`` sent through ``streams`` concurrent streams (each takes the next body when its
    request ends); the wall time from the first request to the last answer, and every result
    in the order of ``bodies``."""
    results: list[Completion | None] = [None] * len(bodies)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                results[i] = await stream_completion(client, url, bodies[i])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(streams, len(bodies)))))
        wall = time.perf_counter() - started
    return wall, [r for r in results if r is not None]
