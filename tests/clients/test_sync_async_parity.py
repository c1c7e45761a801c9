"""The blocking and asyncio clients offer the same API: this walks both, namespace by
namespace (``client.text``, ``client.vision`` and any added later), and compares every
public method's name, parameters, defaults and annotations. A method or namespace
added to one client only, or a parameter that differs, fails here. The blocking client is
generated from the asyncio one (test_sync_client_generation.py), so this guards what the
rewrite rules could still change: a renamed type, a method that stops awaiting."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

from taskserve.clients import AsyncTaskServeClient, TaskServeClient

# What may differ between the two spellings of one API: async iterators, aio channels, callers.
_ASYNC_SPELLINGS = (
    (r"\bAsyncIterator\b", "Iterator"),
    (r"\bAsyncIterable\b", "Iterable"),
    (r"\bAwaitable\[(.*)\]", r"\1"),
    (r"\bgrpc\.aio\.", "grpc."),
    (r"\bAsyncCaller\b", "SyncCaller"),
    (r"\bAsync(?=[A-Z])", ""),
)


def _sync_spelling(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", repr(annotation))
    for pattern, replacement in _ASYNC_SPELLINGS:
        text = re.sub(pattern, replacement, text)
    return text


def _describe(method: Callable[..., Any]) -> tuple[object, ...]:
    sig = inspect.signature(method)
    params = tuple(
        (p.name, p.kind, repr(p.default), _sync_spelling(p.annotation)) for p in sig.parameters.values()
    )
    return params, _sync_spelling(sig.return_annotation)


def _is_namespace(value: object) -> bool:
    """A group of task calls (``client.text``: TextNamespace / AsyncTextNamespace); shared
    plain values such as ``client.options`` are the same object type on both sides."""
    return type(value).__module__.startswith("taskserve.clients.") and type(value).__name__.endswith("Namespace")


def _public(obj: object) -> dict[str, object]:
    return {name: getattr(obj, name) for name in dir(obj) if not name.startswith("_")}


def _walk(sync_obj: object, async_obj: object, path: str, problems: list[str], seen: list[str]) -> None:
    sync_members, async_members = _public(sync_obj), _public(async_obj)
    sync_api = {n for n, v in sync_members.items() if inspect.ismethod(v) or _is_namespace(v)}
    async_api = {n for n, v in async_members.items() if inspect.ismethod(v) or _is_namespace(v)}
    for name in sorted(sync_api - async_api):
        problems.append(f"{path}.{name}: only in the blocking client")
    for name in sorted(async_api - sync_api):
        problems.append(f"{path}.{name}: only in the asyncio client")
    for name in sorted(sync_api & async_api):
        s, a = sync_members[name], async_members[name]
        where = f"{path}.{name}"
        if _is_namespace(s) and _is_namespace(a):
            _walk(s, a, where, problems, seen)
            continue
        if not (inspect.ismethod(s) and inspect.ismethod(a)):
            problems.append(f"{where}: a method on one side, a namespace on the other")
            continue
        seen.append(where)
        if name in ("close", "__enter__", "__exit__"):
            continue  # lifecycle: close() is a coroutine in asyncio and plain in blocking, by design
        if _describe(s) != _describe(a):
            problems.append(f"{where}: blocking {_describe(s)} != asyncio {_describe(a)}")
        streams = "AsyncIterator" in str(inspect.signature(a).return_annotation)
        if not (inspect.iscoroutinefunction(a) or inspect.isasyncgenfunction(a) or streams):
            problems.append(f"{where}: the asyncio client's method neither awaits nor streams")


async def test_blocking_and_asyncio_clients_have_the_same_api() -> None:
    sync_client = TaskServeClient("unused", channel=grpc.insecure_channel("127.0.0.1:9"))
    async_client = AsyncTaskServeClient("unused", channel=grpc.aio.insecure_channel("127.0.0.1:9"))
    try:
        problems: list[str] = []
        seen: list[str] = []
        _walk(sync_client, async_client, "client", problems, seen)
    finally:
        sync_client.close()
        await async_client.close()
    assert problems == []
    # The walk reached into the namespaces (it would pass vacuously on an empty API).
    assert {"client.infer", "client.text.embed", "client.vision.classify"} <= set(seen)


def test_the_walk_catches_a_missing_method_and_a_different_parameter() -> None:
    class TextNamespace:
        def embed(self, texts: list[str], *, model: str) -> None: ...
        def only_here(self) -> None: ...

    class AsyncTextNamespace:
        async def embed(self, texts: list[str], *, model: str, extra: int = 0) -> None: ...

    class Client:
        def __init__(self) -> None:
            self.text = TextNamespace()

    class AsyncClient:
        def __init__(self) -> None:
            self.text = AsyncTextNamespace()

    TextNamespace.__module__ = AsyncTextNamespace.__module__ = "taskserve.clients.fake"
    problems: list[str] = []
    _walk(Client(), AsyncClient(), "client", problems, [])
    assert any("client.text.only_here: only in the blocking client" in p for p in problems)
    assert any(p.startswith("client.text.embed: blocking") for p in problems)
