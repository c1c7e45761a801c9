"""Server settings, built once in main() (or by tests) and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

# auto: GPU metrics when NVML works, silently none otherwise; on: NVML must work; off: never.
GpuMetricsMode = Literal["auto", "on", "off"]
# none: the repository is fixed at startup (v2 Load/Unload refused); explicit: Load/Unload allowed.
ModelControlMode = Literal["none", "explicit"]


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path
    # Loopback unless told otherwise: containers pass --host 0.0.0.0 (Dockerfile, chart).
    host: str = "127.0.0.1"
    # 0 picks a free port (tests); the bound port is on ServingApp.grpc_port.
    grpc_port: int = 8001
    # 0 picks a free port; -1 disables the metrics endpoint.
    metrics_port: int = 8002
    max_receive_message_bytes: int = 256 * 1024 * 1024
    max_send_message_bytes: int = 256 * 1024 * 1024
    # How long in-flight requests get to finish after SIGTERM.
    shutdown_grace_s: float = 30.0
    # How long a model version that a reload or unload takes out of service keeps serving
    # the requests that resolved it before (then it stops, refusing what is left).
    swap_grace_s: float = 30.0
    # Ready only when every model in the repository is READY (otherwise: once startup loading finished).
    strict_readiness: bool = False
    reflection: bool = True
    # Close client connections after this many seconds (0: never) so clients that
    # balance across replicas re-resolve DNS and find new pods.
    max_connection_age_s: float = 0.0
    # GPU metrics through NVML on the metrics endpoint (see gpu_metrics.py).
    gpu_metrics: GpuMetricsMode = "auto"
    # -- the edge: transport security, authentication, model control, drain (docs/security.md) --
    # TLS on the gRPC port from PEM files; with tls_client_ca, clients must present a certificate it signed.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens every RPC must carry (empty: no authentication). Never printed.
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    # Also require a token for grpc.health.v1 and reflection (probes then need one).
    auth_health: bool = False
    model_control_mode: ModelControlMode = "none"
    metrics_host: str = "127.0.0.1"
    # After SIGTERM: seconds health says NOT_SERVING while new RPCs are still accepted, so load
    # balancers and probes see it before the listener closes.
    drain_delay_s: float = 5.0
    # A plaintext port serving grpc.health.v1 only (-1: none), for probes that cannot speak
    # TLS (the kubelet's gRPC probe) when the main port does. 0 picks a free port.
    health_port: int = -1
    # -- the HTTP door (docs/http.md): OpenAI-compatible API and KServe v2 REST --
    # Off (-1) unless given; 0 picks a free port (the bound one is on ServingApp.http_port).
    # Bound to ``host``, with the same TLS files and tokens as the gRPC port.
    http_port: int = -1
    # Largest HTTP request body; a larger Content-Length is refused (413) before the body is read.
    max_http_body_bytes: int = 256 * 1024 * 1024
    # Server-sent event streams share stream_write_timeout_s (below) with the gRPC streams.
    # Request limits (docs/robustness.md): the server's defaults; a model's config.yaml
    # ``limits`` overrides the per-model ones. Checked before any heavy work.
    max_items: int = 256
    max_text_chars: int = 100_000
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000
    max_variable_dim: int = 65_536
    # Elements of one v2 BYTES input (each costs Python work to decode): refused beyond, before decoding.
    max_bytes_elements: int = 65_536
    # Characters of a model name or version in a request, checked before any lookup or file access.
    max_name_chars: int = 255
    # Typed requests and ModelStreamInfer streams open at once (beyond: RESOURCE_EXHAUSTED).
    max_concurrent_requests: int = 1024
    # ModelStreamInfer streams with requests in flight or answers unsent (idle ones do not count).
    max_streams: int = 256
    # -- slow readers (frontends/grpc/streams.py, and the HTTP door's server-sent events):
    # response streams of one client connection open at once, and how long one answer may
    # wait for its client to read before the stream is ended (its generation slot freed).
    max_streams_per_connection: int = 32
    stream_write_timeout_s: float = 30.0
