"""``taskserve-server``: serve a model repository over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskserve.server.frontends.grpc.auth import TOKENS_ENV, TokenError, load_tokens
from taskserve.server.frontends.grpc.tls import TlsFilesError
from taskserve.server.frontends.http import HttpStartError
from taskserve.server.gpu_metrics import GPU_METRICS_MODES, GpuMetricsUnavailable
from taskserve.server.settings import ServerSettings

if TYPE_CHECKING:
    from taskserve.server.frontends.grpc.server import ServingApp


def parse_args(argv: list[str] | None) -> ServerSettings:
    p = argparse.ArgumentParser(prog="taskserve-server", description="Serve a model repository over gRPC.")
    p.add_argument("--model-repository", required=True, type=Path, help="directory of <model>/config.yaml + <version>/")
    p.add_argument("--host", default="127.0.0.1", help="gRPC address to bind (default loopback; 0.0.0.0 in containers)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics port (0: any, -1: off)")
    p.add_argument("--max-message-mb", type=int, default=256, help="largest request/response message, MiB")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument(
        "--swap-grace", type=float, default=30.0,
        help="seconds a model version that a reload or unload retires keeps serving the requests it already had",
    )  # fmt: skip
    p.add_argument("--strict-readiness", action="store_true", help="ready only when every model is READY")
    p.add_argument(
        "--max-connection-age", type=float, default=0.0,
        help="seconds before a client connection is recycled so DNS load balancing sees new replicas (0: never)",
    )  # fmt: skip
    p.add_argument("--no-reflection", action="store_true", help="disable gRPC server reflection")
    p.add_argument(
        "--gpu-metrics", choices=GPU_METRICS_MODES, default="auto",
        help="GPU metrics through NVML on the metrics port (auto: when NVML works; on: refuse to start without)",
    )  # fmt: skip
    p.add_argument("--log-level", default=os.environ.get("TASKSERVE_LOG_LEVEL", "INFO"))
    _add_edge_args(p)
    _add_http_args(p)
    _add_limit_flags(p)
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not a.model_repository.is_dir():
        p.error(f"--model-repository {a.model_repository} is not a directory")
    if a.swap_grace < 0:
        p.error("--swap-grace must be >= 0")
    if a.gpu_metrics == "on" and a.metrics_port < 0:
        p.error("--gpu-metrics on needs the metrics endpoint: drop --metrics-port -1 or use --gpu-metrics off")
    edge = _edge_settings(p, a)
    if not a.stream_write_timeout_s > 0:
        p.error("--stream-write-timeout must be > 0")
    if a.max_streams_per_connection < 1:
        p.error("--max-streams-per-connection must be >= 1")
    if a.max_http_body_mb <= 0:
        p.error("--max-http-body-mb must be > 0")
    return ServerSettings(
        **edge,
        http_port=a.http_port,
        max_http_body_bytes=a.max_http_body_mb * 1024 * 1024,
        model_repository=a.model_repository,
        host=a.host,
        grpc_port=a.grpc_port,
        metrics_port=a.metrics_port,
        max_receive_message_bytes=a.max_message_mb * 1024 * 1024,
        max_send_message_bytes=a.max_message_mb * 1024 * 1024,
        shutdown_grace_s=a.shutdown_grace,
        swap_grace_s=a.swap_grace,
        strict_readiness=a.strict_readiness,
        reflection=not a.no_reflection,
        max_connection_age_s=a.max_connection_age,
        gpu_metrics=a.gpu_metrics,
        **{name: getattr(a, name) for name in _LIMIT_FLAGS},
        stream_write_timeout_s=a.stream_write_timeout_s,
    )


def _add_edge_args(p: argparse.ArgumentParser) -> None:
    """Transport security, authentication, model control, metrics bind and drain (docs/security.md)."""
    p.add_argument("--tls-cert", type=Path, help="PEM certificate chain: serve gRPC over TLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="PEM CA bundle: require client certificates it signed (mTLS)")
    p.add_argument(
        "--auth-tokens-file", type=Path,
        help=f"bearer tokens, one per line (# comments); every RPC needs one. Also ${TOKENS_ENV} (comma-separated)",
    )  # fmt: skip
    p.add_argument("--auth-health", action="store_true", help="require a token for health and reflection too")
    p.add_argument(
        "--model-control-mode", choices=("none", "explicit"), default="none",
        help="none: the repository is fixed at startup, v2 load/unload refused; explicit: allowed",
    )  # fmt: skip
    p.add_argument("--metrics-host", default="127.0.0.1", help="address of the /metrics endpoint (default loopback)")
    p.add_argument(
        "--drain-delay", type=float, default=5.0,
        help="seconds after SIGTERM that health says NOT_SERVING while RPCs are still accepted",
    )  # fmt: skip
    p.add_argument(
        "--health-port", type=int, default=-1,
        help="plaintext port with grpc.health.v1 only, for probes when the gRPC port uses TLS (-1: off)",
    )  # fmt: skip


def _add_http_args(p: argparse.ArgumentParser) -> None:
    """The HTTP door (docs/http.md): OpenAI-compatible API and KServe v2 REST."""
    p.add_argument(
        "--http-port", type=int, default=-1,
        help="HTTP port: OpenAI-compatible /v1 and KServe v2 REST, bound to --host with the same TLS and tokens "
        "(-1: off, the default; 0: any free port)",
    )  # fmt: skip
    p.add_argument(
        "--max-http-body-mb", type=int, default=256,
        help="largest HTTP request body, MiB; larger ones get 413 before they are read (default 256)",
    )  # fmt: skip
    # --stream-write-timeout (shared by both doors' streams) is with the gRPC stream limits below.


def _edge_settings(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    if (a.tls_cert is None) != (a.tls_key is None):
        p.error("--tls-cert and --tls-key go together")
    if a.tls_client_ca is not None and a.tls_cert is None:
        p.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    for flag, path in (("--tls-cert", a.tls_cert), ("--tls-key", a.tls_key), ("--tls-client-ca", a.tls_client_ca)):
        if path is not None and not path.is_file():
            p.error(f"{flag} {path} is not a file")
    if a.drain_delay < 0:
        p.error("--drain-delay must be >= 0")
    try:
        tokens = load_tokens(a.auth_tokens_file)
    except TokenError as err:
        p.error(str(err))
    if a.auth_health and not tokens:
        p.error(f"--auth-health needs tokens: --auth-tokens-file or ${TOKENS_ENV}")
    return {
        "tls_cert": a.tls_cert, "tls_key": a.tls_key, "tls_client_ca": a.tls_client_ca,
        "auth_tokens": tokens, "auth_health": a.auth_health, "model_control_mode": a.model_control_mode,
        "metrics_host": a.metrics_host, "drain_delay_s": a.drain_delay, "health_port": a.health_port,
    }  # fmt: skip


# Request limits (defaults in ServerSettings; a model's config.yaml ``limits`` overrides the per-model ones).
_LIMIT_FLAGS = {
    "max_items": "items (texts, images, pairs, messages) per typed request",
    "max_text_chars": "characters per text",
    "max_image_pixels": "pixels per image (read from its header, before decoding)",
    "max_request_pixels": "pixels over all images of one request",
    "max_variable_dim": "largest size of a variable (-1) dim of a v2 input",
    "max_bytes_elements": "elements of one v2 BYTES input, refused before decoding",
    "max_name_chars": "characters of a model name or version in a request, checked first",
    "max_concurrent_requests": "typed requests processed at once (beyond: RESOURCE_EXHAUSTED)",
    "max_streams": "ModelStreamInfer streams with requests in flight at once (beyond: RESOURCE_EXHAUSTED)",
    "max_streams_per_connection": "response streams one client connection holds open (beyond: RESOURCE_EXHAUSTED)",
}


def _add_limit_flags(p: argparse.ArgumentParser) -> None:
    for name, meaning in _LIMIT_FLAGS.items():
        default = getattr(ServerSettings, name)
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default, help=f"{meaning} (default {default})")
    default_timeout = ServerSettings.stream_write_timeout_s
    p.add_argument(
        "--stream-write-timeout", type=float, default=default_timeout, dest="stream_write_timeout_s",
        help=f"seconds a streamed answer may wait for its client to read, then the stream ends ({default_timeout:g})",
    )  # fmt: skip


async def serve(settings: ServerSettings) -> None:
    from taskserve.server.frontends.grpc.server import create_server

    app = create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    # Machine-readable line for scripts that start the server on port 0.
    health = f" health={app.health_port}" if app.health_port else ""
    http = f" http={app.http_port}" if app.http_port else ""
    print(f"taskserve-server listening grpc={app.grpc_port} metrics={app.metrics_port}{health}{http}", flush=True)
    freezing = asyncio.create_task(_freeze_startup_objects(app))
    await stop.wait()
    freezing.cancel()
    logging.getLogger(__name__).info("shutting down: draining in-flight requests")
    await app.stop()


async def _freeze_startup_objects(app: ServingApp) -> None:
    """Once the repository is loaded, move every object alive then (modules, sessions,
    configs: ~60k) out of the garbage collector's reach. A full collection otherwise walks
    them all, ~30 ms during which no request is served, about once a second under load."""
    await app.wait_until_loaded()
    gc.collect()
    gc.freeze()
    logging.getLogger(__name__).debug("froze %d startup objects", gc.get_freeze_count())


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    settings = parse_args(argv)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(settings))
    except (GpuMetricsUnavailable, TlsFilesError, HttpStartError) as err:
        print(f"taskserve-server: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
