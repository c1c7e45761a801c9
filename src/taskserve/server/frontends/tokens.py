"""The bearer-token check both doors use (gRPC metadata, HTTP ``Authorization`` header).

Compares the presented token with every configured one in constant time and without an
early exit, so the time taken says nothing about which token (or how much of it) matched.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable


class TokenCheck:
    """Immutable after construction; safe to share between threads and event loops."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("authentication needs at least one token")

    def accepts(self, authorization: bytes | None) -> bool:
        """``authorization``: the raw header value (``Bearer <token>``), None when absent."""
        scheme, _, presented = (authorization or b"").partition(b" ")
        if scheme.lower() != b"bearer":
            presented = b""
        presented = presented.strip()
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(presented, token)
        return matched and bool(presented)
