"""Bearer-token authentication for every RPC (``--auth-tokens-file``, ``TASKSERVE_AUTH_TOKENS``).

A grpc.aio interceptor compares the ``authorization: Bearer <token>`` metadata with every
configured token in constant time; anything else is refused with UNAUTHENTICATED before a
servicer runs. Health and reflection stay public (probes and load balancers carry no token)
unless ``--auth-health``.
"""

from __future__ import annotations

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


def _abort_handler(handler: grpc.RpcMethodHandler[Req, Resp], message: str) -> grpc.RpcMethodHandler[Req, Resp]:
    """A handler of the same shape (and serializers) as ``handler`` that only refuses the call."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Req, Resp]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, decode, encode)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, decode, encode)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, decode, encode)
    return grpc.unary_unary_rpc_method_handler(refuse, decode, encode)


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
        return _abort_handler(handler, _REFUSED)
