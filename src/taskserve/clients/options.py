"""Client settings with production defaults, and the gRPC channel options they become.

Retries are not hand-written loops: they are gRPC's own retry machinery, set
through the service config, so they apply to every method (streaming included,
until the first response arrives) with exponential backoff and jitter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc

Compression = Literal["none", "gzip", "deflate"]
LoadBalancing = Literal["round_robin", "pick_first"]

_COMPRESSION = {
    "none": grpc.Compression.NoCompression,
    "gzip": grpc.Compression.Gzip,
    "deflate": grpc.Compression.Deflate,
}


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC retryPolicy: retry these status codes with exponential backoff."""

    max_attempts: int = 5  # gRPC caps this at 5
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0
    retryable_codes: tuple[str, ...] = ("UNAVAILABLE",)

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(f"max_attempts {self.max_attempts}: gRPC allows 2 to 5 (disable retries with retry=None)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s <= 0 or self.backoff_multiplier <= 0:
            raise ValueError("backoff times and multiplier must be positive")

    def to_json(self) -> dict[str, object]:
        return {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s}s",
            "maxBackoff": f"{self.max_backoff_s}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": list(self.retryable_codes),
        }


@dataclass(frozen=True)
class TlsConfig:
    """Server-authenticated TLS, or mutual TLS when a client key and certificate are set (PEM bytes)."""

    root_certificates: bytes | None = None  # None: the system's trust store
    private_key: bytes | None = None
    certificate_chain: bytes | None = None
    # Name to verify the server certificate against when it differs from the target host.
    server_name_override: str | None = None

    def __post_init__(self) -> None:
        if (self.private_key is None) != (self.certificate_chain is None):
            raise ValueError("mutual TLS needs both private_key and certificate_chain (or neither)")

    @classmethod
    def from_files(
        cls,
        root_certificates: str | Path | None = None,
        private_key: str | Path | None = None,
        certificate_chain: str | Path | None = None,
        server_name_override: str | None = None,
    ) -> TlsConfig:
        def read(path: str | Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(root_certificates), read(private_key), read(certificate_chain), server_name_override)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class ClientOptions:
    """Everything about how the client talks to the server; every field has a safe default."""

    # Deadline in seconds applied to every call that does not pass its own.
    timeout_s: float = 30.0
    retry: RetryPolicy | None = field(default_factory=RetryPolicy)
    # Wait for the channel to connect (within the deadline) instead of failing fast.
    wait_for_ready: bool = False
    # Spread calls over every address the name resolves to (a Kubernetes headless
    # Service through a dns:/// target); pick_first sticks to one.
    load_balancing: LoadBalancing = "round_robin"
    # With round_robin, watch each server's grpc.health.v1 status and skip servers that say
    # NOT_SERVING (a draining server is left before it closes its port). Servers without the
    # health service count as healthy: building the channel asks once per target, so gRPC
    # logs no error for them (see health_probe). Turn off against a server run with
    # --auth-health: the health watch carries no per-call token.
    health_check: bool = True
    compression: Compression = "none"
    max_send_message_bytes: int = 64 * 1024 * 1024
    max_receive_message_bytes: int = 64 * 1024 * 1024
    # HTTP/2 keepalive pings detect dead connections behind load balancers. The
    # server must allow pings this often (grpc.http2.min_ping_interval_without_data_ms).
    keepalive_time_ms: int = 60_000
    keepalive_timeout_ms: int = 20_000
    keepalive_permit_without_calls: bool = False
    tls: TlsConfig | None = None
    # Sent with every call, e.g. (("authorization", "Bearer ..."),).
    metadata: tuple[tuple[str, str], ...] = ()
    # Raw extra channel options, appended last so they win.
    extra_channel_options: tuple[tuple[str, str | int], ...] = ()

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        if self.compression not in _COMPRESSION:
            raise ValueError(f"compression {self.compression!r}: use one of {sorted(_COMPRESSION)}")

    def service_config(self) -> str:
        """The gRPC service config JSON: load balancing plus retry for every method."""
        method: dict[str, object] = {"name": [{}]}  # an empty name matches every service and method
        if self.retry is not None:
            method["retryPolicy"] = self.retry.to_json()
        if self.wait_for_ready:
            method["waitForReady"] = True
        config: dict[str, object] = {"loadBalancingConfig": [{self.load_balancing: {}}], "methodConfig": [method]}
        if self.health_check:
            config["healthCheckConfig"] = {"serviceName": ""}
        return json.dumps(config)

    def channel_options(self) -> list[tuple[str, str | int]]:
        opts: list[tuple[str, str | int]] = [
            ("grpc.service_config", self.service_config()),
            ("grpc.enable_retries", 1 if self.retry is not None else 0),
            ("grpc.max_send_message_length", self.max_send_message_bytes),
            ("grpc.max_receive_message_length", self.max_receive_message_bytes),
            ("grpc.keepalive_time_ms", self.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", self.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", int(self.keepalive_permit_without_calls)),
        ]
        if self.tls is not None and self.tls.server_name_override:
            opts.append(("grpc.ssl_target_name_override", self.tls.server_name_override))
        opts.extend(self.extra_channel_options)
        return opts

    def grpc_compression(self) -> grpc.Compression:
        return _COMPRESSION[self.compression]
