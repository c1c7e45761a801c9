"""Latency and throughput summaries of one measurement, and the stability rule for windows."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class LatencySummary:
    """Milliseconds. All zero when nothing completed."""

    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, latencies_s: Sequence[float]) -> LatencySummary:
        if len(latencies_s) == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
        p50, p90, p95, p99 = (float(v) for v in np.percentile(ms, PERCENTILES))
        return cls(p50, p90, p95, p99, float(ms.max()), float(ms.mean()))


@dataclass(frozen=True)
class Window:
    """One measurement window: what completed inside it."""

    duration_s: float
    latencies_s: tuple[float, ...]  # successful calls only
    errors: Mapping[str, int]
    items_per_request: int = 1
    # How long the failed calls took to fail: never mixed into the successes' latencies.
    failure_latencies_s: tuple[float, ...] = ()

    @property
    def throughput_rps(self) -> float:
        """Successful requests per second."""
        return len(self.latencies_s) / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, float | int]:
        lat = LatencySummary.of(self.latencies_s)
        return {
            "duration_s": round(self.duration_s, 3),
            "requests": len(self.latencies_s),
            "errors": sum(self.errors.values()),
            "failure_p50_ms": round(LatencySummary.of(self.failure_latencies_s).p50, 3),
            "throughput_rps": round(self.throughput_rps, 2),
            "p50_ms": round(lat.p50, 3),
            "p99_ms": round(lat.p99, 3),
        }


def is_stable(windows: Sequence[Window], count: int, tolerance: float, metric: str = "throughput") -> bool:
    """The last ``count`` windows agree within ``tolerance`` (spread relative to their mean).

    ``metric`` is "throughput" (closed loop: the server sets the pace) or "p50"
    (open loop: the offered rate sets the throughput; latency shows whether the
    server keeps up). Windows in which nothing succeeded are never stable: a
    server that only fails has no steady state worth a verdict."""
    if len(windows) < count:
        return False
    if metric == "p50":
        recent = [LatencySummary.of(w.latencies_s).p50 for w in windows[-count:]]
    else:
        recent = [w.throughput_rps for w in windows[-count:]]
    if any(not w.latencies_s for w in windows[-count:]):
        return False
    mean = sum(recent) / len(recent)
    if mean == 0:
        return False
    return (max(recent) - min(recent)) / mean <= tolerance


@dataclass(frozen=True)
class RunResult:
    """One point of a sweep (one concurrency, rate or batch size on one server)."""

    server: str
    mode: str  # closed, open, in-process
    load: float  # concurrency, requests/s, or batch size, by mode
    items_per_request: int
    windows: tuple[Window, ...]
    # The windows the figures come from (the stable tail, or all when never stable).
    measured: tuple[Window, ...]
    stable: bool
    repeat: int = 0
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return sum(w.duration_s for w in self.measured)

    @property
    def latencies_s(self) -> list[float]:
        return [x for w in self.measured for x in w.latencies_s]

    @property
    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for w in self.measured:
            total.update(w.errors)
        return dict(total)

    @property
    def failure_latencies_s(self) -> list[float]:
        return [x for w in self.measured for x in w.failure_latencies_s]

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def throughput_rps(self) -> float:
        return len(self.latencies_s) / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def items_per_s(self) -> float:
        return self.throughput_rps * self.items_per_request

    @property
    def unusable(self) -> str | None:
        """Why this run cannot back a verdict (None: it can): a verdict needs a stable,
        error-free run that served something."""
        if not self.latencies_s:
            return f"{self.server}: zero throughput ({self.failed} failed requests)"
        if self.failed:
            return f"{self.server}: {self.failed} failed requests"
        if not self.stable:
            return f"{self.server}: windows never stable"
        return None

    def to_json(self) -> dict[str, object]:
        lat = LatencySummary.of(self.latencies_s)
        return {
            "server": self.server,
            "mode": self.mode,
            "load": self.load,
            "repeat": self.repeat,
            "items_per_request": self.items_per_request,
            "requests": len(self.latencies_s),
            "duration_s": round(self.duration_s, 3),
            "throughput_rps": round(self.throughput_rps, 3),
            "items_per_s": round(self.items_per_s, 3),
            "latency_ms": {k: round(v, 3) for k, v in asdict(lat).items()},
            "errors": self.errors,
            "failed_requests": self.failed,
            "failure_latency_ms": {
                k: round(v, 3) for k, v in asdict(LatencySummary.of(self.failure_latencies_s)).items()
            },
            "stable": self.stable,
            "usable_for_verdict": self.unusable is None,
            "windows": [w.summary() for w in self.windows],
            **self.extra,
        }


def choose_measured(
    windows: Sequence[Window], count: int, tolerance: float, metric: str = "throughput"
) -> tuple[tuple[Window, ...], bool]:
    """The stable tail of ``windows`` when there is one, else all of them."""
    if is_stable(windows, count, tolerance, metric):
        return tuple(windows[-count:]), True
    return tuple(windows), False
