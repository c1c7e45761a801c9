"""``HttpDoor``: serves the HTTP app with uvicorn on the gRPC server's event loop.

``uvicorn.Server.serve()`` is awaited as a task beside ``grpc.aio``'s server: one process,
one loop, no thread, so both doors share the model manager, batchers and engine. The socket
is bound (and listening) before the task starts, so the port is known and refusals to bind
surface from ``start``; with port 0 the kernel picks a free one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from taskserve.server.frontends.http import HttpStartError
from taskserve.server.settings import ServerSettings

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The ServingApp owns SIGTERM/SIGINT: it drains both doors in order.
        yield


class HttpDoor:
    """One HTTP listener. ``start`` and ``stop`` run on the serving event loop; ``stop`` is idempotent."""

    def __init__(self, app: FastAPI, settings: ServerSettings) -> None:
        s = settings
        tls: dict[str, object] = {}
        if s.tls_cert is not None and s.tls_key is not None:
            tls = {"ssl_certfile": str(s.tls_cert), "ssl_keyfile": str(s.tls_key)}
            if s.tls_client_ca is not None:
                tls |= {"ssl_ca_certs": str(s.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.config = uvicorn.Config(
            app,
            log_config=None,  # keep the server's logging setup
            access_log=False,
            lifespan="off",
            proxy_headers=False,  # never trust X-Forwarded-* from callers
            server_header=False,
            timeout_graceful_shutdown=int(s.shutdown_grace_s),
            **tls,  # type: ignore[arg-type]
        )
        self._settings = s
        self._server = _Server(self.config)
        self._task: asyncio.Task[None] | None = None
        self.tls = bool(tls)
        self.port = 0

    async def start(self) -> int:
        """Bind, listen and begin serving; returns the bound port."""
        s = self._settings
        try:
            self.config.load()
        except (OSError, ssl.SSLError) as err:
            raise HttpStartError(f"HTTP port: cannot use --tls-cert/--tls-key/--tls-client-ca ({err})") from None
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((s.host, s.http_port))
            # Listening now: connections that arrive before uvicorn's first tick wait in the backlog.
            sock.listen(self.config.backlog)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise HttpStartError(f"could not bind the HTTP port {s.host}:{s.http_port} ({err.strerror})") from None
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-door")
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting, give in-flight requests (streams included) ``grace`` seconds, then cancel them."""
        if self._task is None:
            return
        self.config.timeout_graceful_shutdown = max(0, math.ceil(grace))
        self._server.should_exit = True
        task, self._task = self._task, None
        try:
            await task
        except Exception:  # the drain of the other door and the models' unload must still run
            log.exception("the HTTP door failed while stopping")
