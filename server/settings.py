"""Server settings, built once in main() (or by tests) and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# auto: GPU metrics when NVML works, silently none otherwise; on: NVML must work; off: never.
GpuMetricsMode = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path
    host: str = "0.0.0.0"
    # 0 picks a free port (tests); the bound port is on ServingApp.grpc_port.
    grpc_port: int = 8001
    # 0 picks a free port; -1 disables the metrics endpoint.
    metrics_port: int = 8002
    max_receive_message_bytes: int = 256 * 1024 * 1024
    max_send_message_bytes: int = 256 * 1024 * 1024
    # How long in-flight requests get to finish after SIGTERM.
    shutdown_grace_s: float = 30.0
    # Ready only when every model in the repository is READY (otherwise: once startup loading finished).
    strict_readiness: bool = False
    reflection: bool = True
    # Close client connections after this many seconds (0: never) so clients that
    # balance across replicas re-resolve DNS and find new pods.
    max_connection_age_s: float = 0.0
    # GPU metrics through NVML on the metrics endpoint (see gpu_metrics.py).
    gpu_metrics: GpuMetricsMode = "auto"
    # Request limits (docs/robustness.md): the server's defaults; a model's config.yaml
    # ``limits`` overrides the per-model ones. Checked before any heavy work.
    max_items: int = 256
    max_text_chars: int = 100_000
    max_image_pixels: int = 40_000_000
    max_request_pixels: int = 100_000_000
    max_variable_dim: int = 65_536
    # Typed requests and ModelStreamInfer streams open at once (beyond: RESOURCE_EXHAUSTED).
    max_concurrent_requests: int = 1024
    max_streams: int = 256
