"""``create_http_app``: the one ASGI app of the HTTP door.

It mounts the OpenAI-compatible routes (openai_routes.py) and the KServe v2 REST routes
(kserve_routes.py) over the parts the gRPC door uses, behind the edge guard (tokens, body
cap: edge.py). No CORS middleware: browsers from other origins are not callers of this door.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from taskserve.server.errors import TaskServeError
from taskserve.server.frontends.http import kserve_routes, openai_routes
from taskserve.server.frontends.http.edge import EdgeGuard
from taskserve.server.frontends.http.errors import HttpError, error_response
from taskserve.server.frontends.parts import ServingParts


def create_http_app(parts: ServingParts) -> FastAPI:
    """The app over ``parts``; serve it with http/server.py's ``HttpDoor`` (or any ASGI server)."""
    s = parts.settings
    # No generated docs or schema routes: they would be public pages the operator did not ask for.
    app = FastAPI(title="taskserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.parts = parts
    app.include_router(openai_routes.build_router(parts))
    app.include_router(kserve_routes.build_router(parts))

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        """200 when the server takes traffic, 503 while it loads or drains (what probes call)."""
        return Response(status_code=200 if parts.ready() else 503)

    _add_error_handlers(app)
    app.add_middleware(
        EdgeGuard, tokens=s.auth_tokens, protect_health=s.auth_health, max_body_bytes=s.max_http_body_bytes
    )
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error leaves through errors.error_response (the one mapping of errors to statuses)."""

    async def known(request: Request, err: Exception) -> JSONResponse:
        return error_response(request.url.path, err)

    async def starlette_http(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        message = "no such route" if err.status_code == 404 else str(err.detail)
        return error_response(request.url.path, HttpError(err.status_code, message, code=None))

    async def validation(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        return error_response(request.url.path, HttpError(400, _validation_message(err), code="invalid_request"))

    app.add_exception_handler(HttpError, known)
    app.add_exception_handler(TaskServeError, known)
    app.add_exception_handler(StarletteHTTPException, starlette_http)
    app.add_exception_handler(RequestValidationError, validation)
    app.add_exception_handler(Exception, known)


def _validation_message(err: RequestValidationError) -> str:
    """A short message from the first validation error: where and what, never the input echoed whole."""
    first = next(iter(err.errors()), None)
    if first is None:
        return "invalid request"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    return f"{where or 'body'}: {first.get('msg', 'invalid value')}"[:300]
