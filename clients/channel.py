"""Build sync and asyncio gRPC channels from ``ClientOptions``.

Targets are anything gRPC resolves: ``host:port``, ``dns:///svc.ns.svc.cluster.local:8001``
(every replica behind a Kubernetes headless Service, balanced round robin), ``unix:/path``.
"""

from __future__ import annotations

import grpc
import grpc.aio
from taskserve.clients.options import ClientOptions


def create_channel(target: str, options: ClientOptions | None = None) -> grpc.Channel:
    opts = options or ClientOptions()
    if opts.tls is not None:
        return grpc.secure_channel(
            target,
            opts.tls.credentials(),
            options=opts.channel_options(),
            compression=opts.grpc_compression(),
        )
    return grpc.insecure_channel(target, options=opts.channel_options(), compression=opts.grpc_compression())


def create_aio_channel(target: str, options: ClientOptions | None = None) -> grpc.aio.Channel:
    opts = options or ClientOptions()
    if opts.tls is not None:
        return grpc.aio.secure_channel(
            target,
            opts.tls.credentials(),
            options=opts.channel_options(),
            compression=opts.grpc_compression(),
        )
    return grpc.aio.insecure_channel(target, options=opts.channel_options(), compression=opts.grpc_compression())
