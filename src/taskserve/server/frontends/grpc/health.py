"""``grpc.health.v1.Health``: the overall status ("") and one entry per model name.

NOT_SERVING until startup loading is done (and, per model, until it is READY);
NOT_SERVING again as soon as the server starts draining.
"""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self._draining = False

    async def set_overall(self, serving: bool) -> None:
        await self.servicer.set("", SERVING if serving and not self._draining else NOT_SERVING)

    async def set_model(self, name: str, serving: bool) -> None:
        await self.servicer.set(name, SERVING if serving and not self._draining else NOT_SERVING)

    async def drain(self) -> None:
        """Everything NOT_SERVING from now on."""
        self._draining = True
        await self.servicer.enter_graceful_shutdown()
