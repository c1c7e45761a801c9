"""The one place where server errors become HTTP statuses and error bodies.

The error classes carry a gRPC-named ``Code`` (server/errors.py); here each maps to an HTTP
status. ``/v1`` answers with OpenAI's error body (``{"error": {"message", "type", "param",
"code"}}``), everything else with KServe v2's (``{"error": "<message>"}``). Unknown
exceptions are logged with their traceback and the caller gets 500 with a generic message.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from taskserve.server.errors import Code, TaskServeError

log = logging.getLogger(__name__)

HTTP_STATUS: dict[Code, int] = {
    Code.INVALID_ARGUMENT: 400,
    Code.FAILED_PRECONDITION: 400,
    Code.NOT_FOUND: 404,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.UNAVAILABLE: 503,
    Code.DEADLINE_EXCEEDED: 504,
    # nginx's "client closed request": the caller is gone, nobody reads it, but logs and metrics do.
    Code.CANCELLED: 499,
    Code.INTERNAL: 500,
}

# OpenAI's error ``type`` by HTTP status (what its SDK and clients switch on).
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "invalid_request_error",
}

OPENAI_PREFIX = "/v1/"


class HttpError(HTTPException):
    """A refusal of the HTTP layer itself (bad JSON, unknown route, auth, body size). An
    HTTPException so that FastAPI passes it on untouched when raised while it reads a body."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(status_code=status, detail=message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param


def describe(err: BaseException) -> HttpError:
    """Status, caller-facing message and reason for any exception."""
    if isinstance(err, HttpError):
        return err
    if isinstance(err, TaskServeError):
        return HttpError(HTTP_STATUS[err.code], err.message, code=err.reason)
    log.error("unexpected error while handling an HTTP request", exc_info=err)
    return HttpError(500, f"internal error ({type(err).__name__}); the server log has the details", "internal")


def openai_error_body(err: HttpError) -> dict[str, object]:
    kind = _OPENAI_TYPES.get(err.status, "server_error" if err.status >= 500 else "invalid_request_error")
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def error_response(path: str, err: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error response for a request to ``path``: OpenAI's shape under /v1, KServe's elsewhere."""
    described = describe(err)
    body = openai_error_body(described) if path.startswith(OPENAI_PREFIX) else {"error": described.message}
    return JSONResponse(body, status_code=described.status, headers=headers)
