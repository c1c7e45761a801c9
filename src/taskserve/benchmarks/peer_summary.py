"""The figures a peer comparison is judged by: taskserve's throughput over each
peer's, and whose p99 is lower, per load point.

Servers run back to back within each repeat, so each repeat gives one paired
ratio measured under nearly the same machine conditions; the headline is the
median of those (this machine drifts by ±20 % between minutes). The ratio of
the per-server medians is reported beside it.

A verdict (met / NOT met) comes only from pairs in which both runs were stable,
error-free and served something (``RunResult.unusable``); a point with no such
pair gets "no verdict" and the reasons. A peer that served nothing is an error
in the results, never left out. Each peer's best setting (``-tuned``) is its
headline; its default-settings run stands beside it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

from taskserve.benchmarks.stats import LatencySummary, RunResult

THROUGHPUT_GOAL = 1.5
OURS = "taskserve"


def _headline_first(peer: str) -> tuple[int, str]:
    return (0 if peer.endswith("-tuned") else 1, peer)


@dataclass(frozen=True)
class PeerPoint:
    """taskserve against one peer at one load, over the repeats."""

    repeats: int
    usable_repeats: int
    excluded_because: tuple[str, ...]
    taskserve_failed: int
    peer_failed: int
    peer_zero_throughput: bool
    # Over the usable pairs only; None when there is none.
    throughput_ratio_paired_median: float | None = None
    throughput_ratio_of_medians: float | None = None
    taskserve_p99_ms: float | None = None
    peer_p99_ms: float | None = None


def paired_point(pairs: list[tuple[RunResult, RunResult]]) -> PeerPoint:
    """The first server of each pair (taskserve, or any numerator) against the second, over
    the repeats: figures from the pairs whose two runs are both usable (``RunResult.unusable``)."""
    usable = [(a, b) for a, b in pairs if a.unusable is None and b.unusable is None]
    excluded = tuple(sorted({why for a, b in pairs for why in (a.unusable, b.unusable) if why}))
    counts = (
        len(pairs), len(usable), excluded, sum(a.failed for a, _ in pairs), sum(b.failed for _, b in pairs),
        any(b.items_per_s == 0 for _, b in pairs),
    )  # fmt: skip
    if not usable:
        return PeerPoint(*counts)
    ours, theirs = [a for a, _ in usable], [b for _, b in usable]
    of_medians = statistics.median(a.items_per_s for a in ours) / statistics.median(b.items_per_s for b in theirs)
    return PeerPoint(
        *counts,
        throughput_ratio_paired_median=round(statistics.median(a.items_per_s / b.items_per_s for a, b in usable), 3),
        throughput_ratio_of_medians=round(of_medians, 3),
        taskserve_p99_ms=round(statistics.median(LatencySummary.of(a.latencies_s).p99 for a in ours), 2),
        peer_p99_ms=round(statistics.median(LatencySummary.of(b.latencies_s).p99 for b in theirs), 2),
    )


def peer_ratios(runs: list[RunResult]) -> dict[str, PeerPoint]:
    """Per "<peer> @ <load>": paired and median throughput ratios over usable pairs, the median
    p99s, and why pairs were left out of the verdict. Tuned peers (the headlines) first."""
    by_point: dict[tuple[float, int], dict[str, RunResult]] = defaultdict(dict)
    for run in runs:
        by_point[(run.load, run.repeat)][run.server] = run
    loads = sorted({load for load, _ in by_point})
    peers = sorted({r.server for r in runs} - {OURS}, key=_headline_first)
    out: dict[str, PeerPoint] = {}
    for peer in peers:
        for load in loads:
            points = [servers for (lo, _), servers in sorted(by_point.items()) if lo == load]
            pairs = [(p[OURS], p[peer]) for p in points if OURS in p and peer in p]
            if pairs:
                out[f"{peer} @ {load:g}"] = paired_point(pairs)
    return out


def verdict_line(key: str, r: PeerPoint) -> str:
    peer = key.split(" @ ")[0]
    role = " (headline: the peer's best setting)" if peer.endswith("-tuned") else ""
    failures = f"; failed requests taskserve {r.taskserve_failed}, {peer} {r.peer_failed}"
    if r.peer_zero_throughput:
        failures += f"; ERROR: {peer} served nothing in at least one repeat"
    if r.throughput_ratio_paired_median is None:
        why = "; ".join(r.excluded_because)
        return f"taskserve / {key}{role}: no verdict, no stable error-free pair ({why}){failures}"
    ratio = r.throughput_ratio_paired_median
    met = "met" if ratio >= THROUGHPUT_GOAL else "NOT met"
    p99 = "lower" if (r.taskserve_p99_ms or 0) < (r.peer_p99_ms or 0) else "NOT lower"
    left_out = f", {r.repeats - r.usable_repeats} left out" if r.usable_repeats != r.repeats else ""
    return (
        f"taskserve / {key}{role}: throughput {ratio:.3f} (median of {r.usable_repeats} stable error-free paired "
        f"repeats{left_out}; ratio of medians {r.throughput_ratio_of_medians}; >= {THROUGHPUT_GOAL}: {met}), "
        f"p99 {r.taskserve_p99_ms} vs {r.peer_p99_ms} ms ({p99}){failures}"
    )


def summarize(runs: list[RunResult]) -> tuple[dict[str, object], list[str]]:
    """Ratios and verdicts for the results files (and the terminal)."""
    ratios = peer_ratios(runs)
    lines = [verdict_line(key, r) for key, r in ratios.items()]
    for line in lines:
        print(line)
    return {"ratios": {key: asdict(r) for key, r in ratios.items()}}, lines
