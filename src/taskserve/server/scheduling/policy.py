"""The batcher's knobs, taken from a model's config, and the batch-size choice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from taskserve.server.repository.config import ModelConfig


@dataclass(frozen=True)
class BatchPolicy:
    # Most rows in one batch; 1 for a model without a batch dimension (requests run alone).
    max_rows: int = 1
    # How long a partial batch may wait for more requests while other batches run.
    max_queue_delay_s: float = 0.0
    preferred_rows: tuple[int, ...] = ()
    # Queued requests beyond this are refused (0: unbounded).
    max_queue_size: int = 0
    priority_levels: int = 1
    default_priority: int = 1
    # Timeout for requests that carry no deadline (0: none).
    default_timeout_s: float = 0.0
    # Batches expected to compute within this long run on the event loop (0: never).
    inline_compute_s: float = 0.0

    @classmethod
    def from_config(cls, config: ModelConfig) -> BatchPolicy:
        db = config.dynamic_batching
        return cls(
            max_rows=max(1, config.max_batch_size),
            max_queue_delay_s=db.max_queue_delay_us / 1e6,
            preferred_rows=tuple(sorted(set(db.preferred_batch_sizes))),
            max_queue_size=db.max_queue_size,
            priority_levels=db.priority_levels,
            default_priority=db.default_priority,
            default_timeout_s=db.default_timeout_us / 1e6,
            inline_compute_s=db.inline_compute_us / 1e6,
        )

    def is_complete(self, rows: int, blocked: bool) -> bool:
        """Waiting cannot make this batch better: it is full, the next request
        does not fit, or it reached the largest preferred size."""
        if rows >= self.max_rows or blocked:
            return True
        return bool(self.preferred_rows) and rows >= self.preferred_rows[-1]

    def cut(self, rows: Sequence[int]) -> int:
        """How many of the candidate requests (rows each, in order) to take: the
        longest prefix whose row total is a preferred size, else all of them."""
        if not self.preferred_rows:
            return len(rows)
        preferred = set(self.preferred_rows)
        total, best = 0, 0
        for count, r in enumerate(rows, start=1):
            total += r
            if total in preferred:
                best = count
        return best or len(rows)
