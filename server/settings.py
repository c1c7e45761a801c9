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
