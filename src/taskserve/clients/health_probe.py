"""Whether a target serves grpc.health.v1, asked once per target before a channel watches it.

gRPC's own client-side health checking treats a server without the health service as
serving, but gRPC core logs an ERROR for every connection that finds the service missing
(KServe's and MLServer's servers answer UNIMPLEMENTED). One Watch call on a throw-away
channel tells beforehand; where the answer is UNIMPLEMENTED the caller builds its channel
without the health watch: the same outcome (every server counts as serving), one INFO line.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import grpc

logger = logging.getLogger(__name__)

# The method gRPC core's health watch calls; raw bytes so the client needs no grpc_health.
_WATCH = "/grpc.health.v1.Health/Watch"
_EMPTY_REQUEST = b""  # HealthCheckRequest(service=""): the server as a whole

_lock = threading.Lock()
# target -> whether it serves the health service; definitive answers only.
_known: dict[str, bool] = {}


def serves_health(target: str, open_channel: Callable[[], grpc.Channel], timeout_s: float) -> bool:
    """False only when ``target`` answered the health Watch with UNIMPLEMENTED. A target
    that could not be reached counts as True (gRPC's own watch then decides) and is asked
    again next time. The first call per target blocks for one call on a channel from
    ``open_channel``, at most ``timeout_s``; later ones read the cache. Thread-safe."""
    with _lock:
        known = _known.get(target)
    if known is not None:
        return known
    answer = _ask(open_channel, timeout_s)
    if answer is None:
        return True
    with _lock:
        first = target not in _known
        _known[target] = answer
    if first and not answer:
        logger.info("%s does not serve grpc.health.v1 (UNIMPLEMENTED): its servers count as serving", target)
    return answer


def _ask(open_channel: Callable[[], grpc.Channel], timeout_s: float) -> bool | None:
    """True: the service is there; False: UNIMPLEMENTED; None: no answer (unreachable, too slow)."""
    with open_channel() as channel:
        watch: grpc.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(_WATCH)
        call = watch(_EMPTY_REQUEST, timeout=timeout_s)
        try:
            next(call)  # the first status update
        except StopIteration:
            return True  # the stream ended cleanly: the method exists
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return False
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            return True  # e.g. UNAUTHENTICATED under --auth-health: the service is there
        finally:
            call.cancel()
        return True
