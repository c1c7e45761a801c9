"""The services of the gRPC port, recorded once and registered on any number of servers.

grpc.aio stops a server for good when its accept loop raises, and a request can make it
raise before any handler or interceptor runs (a ``:path`` that is not UTF-8 fails grpc's own
decoding there). ``ServingApp`` then builds a new server on the same port; the servicers,
their state and the model manager's hooks stay as they are, because the new server gets the
very handlers recorded here instead of registering the servicers a second time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

import grpc
import grpc.aio


class ServiceRegistry:
    """Stands in for a server while services register (the ``add_*_to_server`` functions only
    call the two methods below); ``register_on`` hands everything to a real server."""

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: list[tuple[str, Mapping[str, Any]]] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        self._registered.append((service, dict(handlers)))

    def as_server(self) -> grpc.aio.Server:
        """This registry typed as what ``add_*_to_server`` expect."""
        return cast(grpc.aio.Server, self)

    def register_on(self, server: grpc.aio.Server) -> None:
        for service, handlers in self._registered:
            server.add_registered_method_handlers(service, handlers)
        if self._generic:
            server.add_generic_rpc_handlers(tuple(self._generic))
