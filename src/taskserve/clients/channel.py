"""Build sync and asyncio gRPC channels from ``ClientOptions``.

Targets are anything gRPC resolves: ``host:port``, ``dns:///svc.ns.svc.cluster.local:8001``
(every replica behind a Kubernetes headless Service, balanced round robin), ``unix:/path``,
or a fixed list of servers, ``ipv4:10.0.0.1:8001,10.0.0.2:8001`` (see ``static_target``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace

import grpc
import grpc.aio

from taskserve.clients.health_probe import serves_health
from taskserve.clients.options import ClientOptions

# Enough for a round trip to a reachable server; an unreachable one costs this once per channel.
_PROBE_TIMEOUT_S = 1.0


def create_channel(target: str, options: ClientOptions | None = None) -> grpc.Channel:
    return _sync_channel(target, _decide_health_watch(target, options or ClientOptions()))


def create_aio_channel(target: str, options: ClientOptions | None = None) -> grpc.aio.Channel:
    """Built in the calling thread; the first channel to a round_robin target with
    ``health_check`` makes one blocking call there (see ``_decide_health_watch``)."""
    opts = _decide_health_watch(target, options or ClientOptions())
    if opts.tls is not None:
        return grpc.aio.secure_channel(
            target,
            opts.tls.credentials(),
            options=opts.channel_options(),
            compression=opts.grpc_compression(),
        )
    return grpc.aio.insecure_channel(target, options=opts.channel_options(), compression=opts.grpc_compression())


def _sync_channel(target: str, opts: ClientOptions) -> grpc.Channel:
    if opts.tls is not None:
        return grpc.secure_channel(
            target,
            opts.tls.credentials(),
            options=opts.channel_options(),
            compression=opts.grpc_compression(),
        )
    return grpc.insecure_channel(target, options=opts.channel_options(), compression=opts.grpc_compression())


def _decide_health_watch(target: str, opts: ClientOptions) -> ClientOptions:
    """``opts``, without the health watch where the target lacks the health service.
    Only round_robin watches health (gRPC's pick_first never does), so only it asks."""
    if not (opts.health_check and opts.load_balancing == "round_robin"):
        return opts
    # One connection, no retries, no waiting: an absent or slow server is "no answer".
    probe = replace(opts, health_check=False, load_balancing="pick_first", retry=None, wait_for_ready=False)
    timeout_s = min(opts.timeout_s, _PROBE_TIMEOUT_S)
    if serves_health(target, lambda: _sync_channel(target, probe), timeout_s):
        return opts
    return replace(opts, health_check=False)


def static_target(addresses: Sequence[str]) -> str:
    """One target for several servers given as ``IP:port`` (``[IPv6]:port``), e.g.
    ``static_target(["10.0.0.1:8001", "10.0.0.2:8001"])`` -> ``"ipv4:10.0.0.1:8001,10.0.0.2:8001"``.

    With the default ``load_balancing="round_robin"`` calls spread over every server, and a
    call that fails UNAVAILABLE (a server stopping or gone) is retried on another one by the
    retry policy. Host names need a DNS target instead: ``dns:///name:port``.
    """
    if not addresses:
        raise ValueError("static_target needs at least one IP:port address")
    families = set()
    for address in addresses:
        host, sep, port = address.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            families.add(ipaddress.ip_address(host).version)
        except ValueError:
            raise ValueError(f"{address!r} is not IP:port; use a dns:/// target for host names") from None
        if not sep or not port.isdigit():
            raise ValueError(f"{address!r} has no port")
    if len(families) > 1:
        raise ValueError("gRPC cannot mix IPv4 and IPv6 addresses in one static target")
    return f"ipv{families.pop()}:" + ",".join(addresses)
