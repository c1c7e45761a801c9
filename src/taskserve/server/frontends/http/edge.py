"""Cheap refusals before a handler runs or a body byte is read: the bearer token (from the
``Authorization`` header, with the check the gRPC door uses) and the request body size
(``Content-Length`` against the cap at once; a chunked body is counted as it is read).

A pure ASGI middleware: it sees the headers in the connection scope, before ``receive`` is
ever called, so a refused caller's body is never buffered.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from taskserve.server.frontends.http.errors import HttpError, error_response
from taskserve.server.frontends.tokens import TokenCheck

# Routes a caller without a token may use unless --auth-health: what probes and load balancers call.
PUBLIC_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
_REFUSED = "missing or invalid bearer token: send the header 'Authorization: Bearer <token>'"


class EdgeGuard:
    """Wraps the app; immutable after construction."""

    def __init__(
        self, app: ASGIApp, tokens: tuple[str, ...] = (), protect_health: bool = False, max_body_bytes: int = 0
    ) -> None:
        self.app = app
        self._check = TokenCheck(tokens) if tokens else None
        self._public = frozenset() if protect_health else PUBLIC_PATHS
        self._max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if self._check is not None and path not in self._public:
            authorization = next((v for k, v in headers if k == b"authorization"), None)
            if not self._check.accepts(authorization):
                refusal = HttpError(401, _REFUSED, code="invalid_api_key")
                await error_response(path, refusal, {"www-authenticate": "Bearer"})(scope, receive, send)
                return
        if self._max_body > 0:
            declared = next((v for k, v in headers if k == b"content-length"), None)
            if declared is not None and (not declared.isdigit() or int(declared) > self._max_body):
                await error_response(path, self._too_large(), {"connection": "close"})(scope, receive, send)
                return
            receive = self._counted(receive)
        await self.app(scope, receive, send)

    def _too_large(self) -> HttpError:
        return HttpError(
            413,
            f"request body larger than the server's limit of {self._max_body} bytes (--max-http-body-mb)",
            code="body_too_large",
        )

    def _counted(self, receive: Receive) -> Receive:
        """``receive`` that raises 413 once a body without Content-Length passes the cap."""
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self._max_body:
                    raise self._too_large()
            return message

        return counted
