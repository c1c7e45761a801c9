"""Builds and runs the gRPC server: v2 protocol, typed task services, health,
reflection, plus the Prometheus endpoint. ``create_server`` is the factory tests use."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.exposition import start_http_server

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.auth import BearerTokenInterceptor, withhold_header_bytes
from taskserve.server.frontends.grpc.health import HealthReporter
from taskserve.server.frontends.grpc.malformed import guard
from taskserve.server.frontends.grpc.registry import ServiceRegistry
from taskserve.server.frontends.grpc.streams import StreamGate, StreamLimits, limit_streams
from taskserve.server.frontends.grpc.tasks import add_task_servicers
from taskserve.server.frontends.grpc.tls import server_credentials
from taskserve.server.frontends.grpc.v2_servicer import V2Servicer
from taskserve.server.frontends.parts import ServingParts, build_tasks
from taskserve.server.gpu_metrics import GpuCollector, start_gpu_metrics
from taskserve.server.metrics import ServerMetrics
from taskserve.server.repository.config import ModelLimits
from taskserve.server.serving.manager import ModelManager
from taskserve.server.settings import ServerSettings
from taskserve.server.tasks.base import TaskLimits

if TYPE_CHECKING:
    from taskserve.server.frontends.http.server import HttpDoor

log = logging.getLogger(__name__)


class ServingApp:
    """One server: its gRPC server, model manager, health and metrics endpoint.

    ``start`` binds the ports and begins loading models in the background (health
    says NOT_SERVING until they are ready); ``stop`` drains and shuts down. Both
    run on the event loop that serves the requests.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.models = ModelManager(
            settings.model_repository, self.metrics, _model_limits(settings),
            max_name_chars=settings.max_name_chars, retire_grace_s=settings.swap_grace_s,
        )
        self.health = HealthReporter()
        self.grpc_port = 0
        self.metrics_port = 0
        self.health_port = 0
        # The HTTP door's bound port (0 while it is off).
        self.http_port = 0
        self._http_door: HttpDoor | None = None
        self._health_server: grpc.aio.Server | None = None
        self._draining = False
        self._server: grpc.aio.Server | None = None
        self._http: Any = None
        self.gpu_metrics: GpuCollector | None = None
        self._loading: asyncio.Task[None] | None = None
        self._guarding: asyncio.Task[None] | None = None
        self._registry = ServiceRegistry()
        self._options: list[tuple[str, int]] = []
        self._interceptors: list[grpc.aio.ServerInterceptor] = []
        self.service_names: list[str] = []
        # Write timeout and per-connection cap of every response stream but health's Watch.
        self.streams = StreamGate(StreamLimits(settings.stream_write_timeout_s, settings.max_streams_per_connection))
        # What both doors share: tasks (worker pool, admission), models, metrics, readiness.
        self.parts = ServingParts(
            settings=settings,
            models=self.models,
            tasks=build_tasks(self.models, _task_limits(settings)),
            metrics=self.metrics,
            ready=self.ready,
        )

    def ready(self) -> bool:
        if self._draining or not self.models.startup_complete:
            return False
        return self.models.all_ready() if self.settings.strict_readiness else True

    async def start(self) -> None:
        """Raises ``GpuMetricsUnavailable`` (before binding any port) for ``gpu_metrics="on"`` without NVML."""
        s = self.settings
        if s.metrics_port >= 0:
            # GPU metrics live on the metrics endpoint: without one, NVML is not even loaded.
            self.gpu_metrics = start_gpu_metrics(s.gpu_metrics, self.metrics.registry)
        try:
            await self._start()
        except BaseException:
            if self.gpu_metrics is not None:
                self.gpu_metrics.close()
            raise

    async def _start(self) -> None:
        s = self.settings
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", s.max_receive_message_bytes),
            ("grpc.max_send_message_length", s.max_send_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if s.max_connection_age_s > 0:
            age_ms = int(s.max_connection_age_s * 1000)
            options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
        withhold_header_bytes()  # with or without tokens: any header may carry a secret
        self._interceptors = [BearerTokenInterceptor(s.auth_tokens, s.auth_health)] if s.auth_tokens else []
        self._options = options
        # Services register once, into a registry that any gRPC server built later gets too.
        registry = ServiceRegistry()
        # Services register through guard(): malformed request messages get INVALID_ARGUMENT;
        # and, but for health, through limit_streams(): clients that do not read cannot hold them.
        guarded = guard(registry.as_server())
        limited = guard(limit_streams(registry.as_server(), self.streams))
        # One worker pool for CPU-heavy request work: typed pre/post-processing, large v2 decodes.
        workers = self.parts.tasks.context.executor
        v2 = V2Servicer(
            self.models, self.ready, s.model_control_mode, s.max_streams, workers=workers, tasks=self.parts.tasks
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(v2, limited)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, guarded)
        names = [pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name]
        names += add_task_servicers(limited, self.models, tasks=self.parts.tasks)
        names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
        self.service_names = names
        if s.reflection:
            _enable_reflection(registry.as_server(), names)
        self._registry = registry
        self._server, self.grpc_port = await self._serve_grpc(s.grpc_port)
        self._guarding = asyncio.create_task(self._serve_again_if_stopped())
        if s.http_port >= 0:
            # Same process and event loop as the gRPC server (http/server.py); imported only
            # when asked for, so a gRPC-only server does not load the ASGI stack.
            from taskserve.server.frontends.http.app import create_http_app
            from taskserve.server.frontends.http.server import HttpDoor

            door = HttpDoor(create_http_app(self.parts), s)
            try:
                self.http_port = await door.start()
            except BaseException:
                self._guarding.cancel()
                await self._server.stop(0)
                raise
            self._http_door = door
        if s.health_port >= 0:
            await self._start_health_port(s)
        if s.metrics_port >= 0:
            self._http, _ = start_http_server(s.metrics_port, addr=s.metrics_host, registry=self.metrics.registry)
            self.metrics_port = self._http.server_port
        await self.health.set_overall(False)
        self.models.add_listener(self._on_model_change)
        log.info(
            "gRPC on %s:%d%s (%s%s, model control %s), metrics on %s:%d", s.host, self.grpc_port,
            f", HTTP on {s.host}:{self.http_port}" if self._http_door else "",
            "mutual TLS" if s.tls_client_ca else "TLS" if s.tls_cert else "plaintext",
            ", bearer tokens" if s.auth_tokens else "", s.model_control_mode, s.metrics_host, self.metrics_port,
        )  # fmt: skip
        self._loading = asyncio.create_task(self._load_models())

    async def _serve_grpc(self, port: int, attempts: int = 1) -> tuple[grpc.aio.Server, int]:
        """A started gRPC server with every service, bound to ``port`` (0: any free port)."""
        s = self.settings
        address = f"[{s.host}]:{port}" if ":" in s.host else f"{s.host}:{port}"
        for attempt in range(attempts):
            server = grpc.aio.server(options=self._options, interceptors=self._interceptors)
            self._registry.register_on(server)
            if s.tls_cert is not None and s.tls_key is not None:
                bound = server.add_secure_port(address, server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca))
            else:
                bound = server.add_insecure_port(address)
            if bound:
                await server.start()
                return server, bound
            await asyncio.sleep(0.05 * (attempt + 1))  # the stopped server may still hold the port
        raise OSError(f"could not bind gRPC port {address}")

    async def _serve_again_if_stopped(self) -> None:
        """grpc.aio shuts a server down when its accept loop raises, which a single malformed
        request can cause before any of our code runs (registry.py): serve again on the same port."""
        while self._server is not None:
            server = self._server
            try:
                await server.wait_for_termination()
                failure = "without an error"
            except Exception as err:  # what stopped grpc's accept loop, re-raised by grpc
                failure = type(err).__name__
            if self._draining:
                return
            log.error("the gRPC server stopped unasked (%s in grpc's accept loop); serving again", failure)
            try:
                self._server, _ = await self._serve_grpc(self.grpc_port, attempts=40)
            except OSError as err:
                log.critical("the gRPC port stays closed: %s", err)  # probes fail and the pod is replaced
                return

    async def _start_health_port(self, s: ServerSettings) -> None:
        """grpc.health.v1 alone, in plaintext, on its own port: what a probe that cannot speak
        TLS checks. It shares the health state, so it turns NOT_SERVING with the main port."""
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, health_server)
        address = f"[{s.host}]:{s.health_port}" if ":" in s.host else f"{s.host}:{s.health_port}"
        self.health_port = health_server.add_insecure_port(address)
        if self.health_port == 0:
            raise OSError(f"could not bind the health port {address}")
        await health_server.start()
        self._health_server = health_server

    def _on_model_change(self, name: str, ready: bool) -> None:
        # Called from the manager on the event loop; health updates are coroutines.
        asyncio.get_running_loop().create_task(self._update_health(name, ready))

    async def _update_health(self, name: str, ready: bool) -> None:
        await self.health.set_model(name, ready)
        await self.health.set_overall(self.ready())

    async def _load_models(self) -> None:
        try:
            await self.models.load_all()
        except Exception:
            log.exception("loading the model repository failed")
            self.models.startup_complete = True
        await self.health.set_overall(self.ready())

    async def wait_until_loaded(self) -> None:
        if self._loading is not None:
            await asyncio.shield(self._loading)

    async def stop(self, grace: float | None = None, drain_delay: float | None = None) -> None:
        """Say NOT_SERVING, keep accepting requests for ``drain_delay`` seconds, then stop
        accepting, let in-flight ones finish within ``grace``, unload models. Idempotent."""
        if self._draining:
            return
        self._draining = True
        grace = self.settings.shutdown_grace_s if grace is None else grace
        delay = self.settings.drain_delay_s if drain_delay is None else drain_delay
        await self.health.drain()
        if delay > 0:
            # Probes and load balancers need time to see NOT_SERVING and move traffic away;
            # requests that still arrive meanwhile are served, not refused.
            log.info("draining: NOT_SERVING, still accepting requests for %.1fs", delay)
            await asyncio.sleep(delay)
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
        # Both doors refuse new requests at once and wait up to `grace` for in-flight ones.
        stopping = [self._server.stop(grace)] if self._server is not None else []
        if self._http_door is not None:
            stopping.append(self._http_door.stop(grace))
        await asyncio.gather(*stopping)
        if self._guarding is not None:
            self._guarding.cancel()
        if self._health_server is not None:
            await self._health_server.stop(0)
        await self.models.stop(drain=True)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.gpu_metrics is not None:
            self.gpu_metrics.close()
        log.info("server stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def _enable_reflection(server: grpc.aio.Server, names: list[str]) -> None:
    """Reflection over taskserve's private descriptor pool (see protocol/codegen.py),
    with the health and reflection protos copied into it so every listed service resolves."""
    from google.protobuf.descriptor import FileDescriptor
    from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

    from taskserve.protocol.generated._pool import POOL

    for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
        assert isinstance(descriptor, FileDescriptor)
        try:
            POOL.FindFileByName(descriptor.name)
        except KeyError:
            POOL.AddSerializedFile(descriptor.serialized_pb)
    # The asyncio servicer, named directly: enable_server_reflection picks it only for a real
    # grpc.aio.Server, and services register into a ServiceRegistry here.
    servicer = reflection.aio.ReflectionServicer([*names, reflection.SERVICE_NAME], pool=POOL)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)


def _model_limits(s: ServerSettings) -> ModelLimits:
    """The server's per-model limit defaults (the --max-* flags)."""
    return ModelLimits(
        max_items=s.max_items,
        max_text_chars=s.max_text_chars,
        max_image_pixels=s.max_image_pixels,
        max_request_pixels=s.max_request_pixels,
        max_variable_dim=s.max_variable_dim,
        max_bytes_elements=s.max_bytes_elements,
    )


def _task_limits(s: ServerSettings) -> TaskLimits:
    return TaskLimits(
        max_items=s.max_items,
        max_text_chars=s.max_text_chars,
        max_image_pixels=s.max_image_pixels,
        max_request_pixels=s.max_request_pixels,
        max_concurrent_requests=s.max_concurrent_requests,
    )


def create_server(settings: ServerSettings) -> ServingApp:
    """Build a server; call ``await app.start()`` on the event loop that will serve it."""
    return ServingApp(settings)
