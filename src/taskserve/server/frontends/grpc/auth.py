"""Bearer-token authentication for every RPC (``--auth-tokens-file``, ``TASKSERVE_AUTH_TOKENS``).

A grpc.aio interceptor compares the ``authorization: Bearer <token>`` metadata with every
configured token in constant time; anything else is refused with UNAUTHENTICATED before a
servicer runs, and before the request body is read: the refusing handler never asks grpc for
the message, so an unauthenticated caller costs no more than its headers. Health and
reflection stay public (probes and load balancers carry no token) unless ``--auth-health``.

Header values never reach a log: grpc logs a metadata value that is not UTF-8 in full, with a
traceback, before any interceptor runs; ``withhold_header_bytes`` filters those records out.
"""

from __future__ import annotations

import logging
import os
import string
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio

from taskserve.server.frontends.tokens import TokenCheck

Req = TypeVar("Req")
Resp = TypeVar("Resp")

TOKENS_ENV = "TASKSERVE_AUTH_TOKENS"
# Method prefixes a caller without a token may use unless health is protected too.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.", "/grpc.reflection.v1.")
_REFUSED = "missing or invalid bearer token: send the metadata 'authorization: Bearer <token>'"
_TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + string.punctuation)
# What grpc's Cython layer logs (at ERROR, with a traceback, the value in full) when a
# metadata value or method name is not UTF-8; it then carries on with a latin-1 decoding.
_GRPC_LOGGER = "grpc._cython.cygrpc"
_GRPC_INVALID_ENCODING = "Invalid encoding on %s"

log = logging.getLogger(__name__)


class TokenError(ValueError):
    """The configured tokens are unusable; the message says which source and why."""


def parse_tokens(text: str, source: str, separators: str = "\n") -> list[str]:
    """Tokens from ``text``: one per line (or per separator); blank and ``#`` lines ignored."""
    for sep in separators[1:]:
        text = text.replace(sep, separators[0])
    tokens = []
    for number, raw in enumerate(text.split(separators[0]), 1):
        token = raw.strip()
        if not token or token.startswith("#"):
            continue
        if not set(token) <= _TOKEN_CHARS:
            # Never echo the token itself: it is a secret.
            raise TokenError(f"{source}: token {number} has characters outside printable ASCII or spaces")
        tokens.append(token)
    return tokens


def load_tokens(tokens_file: Path | None, environ: dict[str, str] | None = None) -> tuple[str, ...]:
    """Tokens from the file and the environment variable (comma- or newline-separated), merged."""
    env = os.environ if environ is None else environ
    tokens: list[str] = []
    if tokens_file is not None:
        try:
            text = tokens_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise TokenError(f"--auth-tokens-file {tokens_file}: cannot read it ({err})") from None
        tokens += parse_tokens(text, f"--auth-tokens-file {tokens_file}")
        if not tokens:
            raise TokenError(f"--auth-tokens-file {tokens_file} holds no token; one token per line")
    if env.get(TOKENS_ENV, "").strip():
        tokens += parse_tokens(env[TOKENS_ENV], TOKENS_ENV, separators="\n,")
    return tuple(dict.fromkeys(tokens))


def _refusing_handler(handler: grpc.RpcMethodHandler[Req, Resp], message: str) -> grpc.RpcMethodHandler[Req, Resp]:
    """A handler that refuses the call without reading its request.

    grpc.aio reads and deserializes the request of a unary-request handler before calling
    it; a request-streaming handler gets an iterator it may never touch. So whatever the
    method's shape, the refusal is request-streaming, has no deserializer and aborts at once:
    the body stays in the transport's flow-control window and is dropped with the stream.
    The client sees the same status whatever shape it called.
    """

    async def refuse(requests: Any, context: grpc.aio.ServicerContext[Req, Resp]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


class _WithholdHeaderBytes(logging.Filter):
    """Drops grpc's log record of a header value that is not UTF-8 (it prints the value, which
    may be a token, and a traceback); a DEBUG line of ours says it happened, without the value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _GRPC_INVALID_ENCODING:
            return True
        log.debug("a request carried a header value or method name that is not UTF-8 (value withheld)")
        return False


_WITHHOLD = _WithholdHeaderBytes()


def withhold_header_bytes() -> None:
    """Keep request header values out of grpc's log records. Idempotent; the server calls it at start."""
    grpc_log = logging.getLogger(_GRPC_LOGGER)
    if _WITHHOLD not in grpc_log.filters:
        grpc_log.addFilter(_WITHHOLD)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: Iterable[str], protect_health: bool = False) -> None:
        tokens = tuple(tokens)
        if not tokens:
            raise TokenError("authentication needs at least one token")
        # The constant-time comparison is shared with the HTTP door (frontends/tokens.py).
        self._check = TokenCheck(tokens)
        self._public = () if protect_health else PUBLIC_PREFIXES

    def authorized(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        raw: bytes | None = None
        for key, value in metadata or ():
            if key == "authorization":
                raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
                break
        return self._check.accepts(raw)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Req, Resp] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Req, Resp] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(self._public):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusing_handler(handler, _REFUSED)
