"""The figures a peer comparison is judged by: taskserve's throughput over each
peer's, and whose p99 is lower, per load point.

Servers run back to back within each repeat, so each repeat gives one paired
ratio measured under nearly the same machine conditions; the headline is the
median of those (this machine drifts by ±20 % between minutes). The ratio of
the per-server medians is reported beside it.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

from taskserve.benchmarks.stats import LatencySummary, RunResult

THROUGHPUT_GOAL = 1.5


def peer_ratios(runs: list[RunResult]) -> dict[str, dict[str, float]]:
    """Per "<peer> @ <load>": paired and median throughput ratios, and the median p99s."""
    by_point: dict[tuple[float, int], dict[str, RunResult]] = defaultdict(dict)
    for run in runs:
        by_point[(run.load, run.repeat)][run.server] = run
    loads = sorted({load for load, _ in by_point})
    peers = sorted({r.server for r in runs} - {"taskserve"})
    out: dict[str, dict[str, float]] = {}
    for load in loads:
        points = [servers for (lo, _), servers in sorted(by_point.items()) if lo == load]
        ours = [p["taskserve"] for p in points if "taskserve" in p]
        if not ours:
            continue
        for peer in peers:
            pairs = [(p["taskserve"], p[peer]) for p in points if "taskserve" in p and peer in p]
            theirs = [b for _, b in pairs]
            if not pairs or any(b.items_per_s == 0 for b in theirs):
                continue
            paired = [a.items_per_s / b.items_per_s for a, b in pairs]
            of_medians = statistics.median(a.items_per_s for a in ours) / statistics.median(
                b.items_per_s for b in theirs
            )
            out[f"{peer} @ {load:g}"] = {
                "throughput_ratio_paired_median": round(statistics.median(paired), 3),
                "throughput_ratio_of_medians": round(of_medians, 3),
                "taskserve_p99_ms": round(statistics.median(LatencySummary.of(a.latencies_s).p99 for a in ours), 2),
                "peer_p99_ms": round(statistics.median(LatencySummary.of(b.latencies_s).p99 for b in theirs), 2),
                "repeats": len(pairs),
            }
    return out


def summarize(runs: list[RunResult]) -> tuple[dict[str, object], list[str]]:
    """Ratios and verdicts for the results files (and the terminal)."""
    ratios = peer_ratios(runs)
    lines = []
    for key, r in ratios.items():
        met = "met" if r["throughput_ratio_paired_median"] >= THROUGHPUT_GOAL else "NOT met"
        p99 = "lower" if r["taskserve_p99_ms"] < r["peer_p99_ms"] else "NOT lower"
        lines.append(
            f"taskserve / {key}: throughput {r['throughput_ratio_paired_median']:.3f} (median of "
            f"{r['repeats']} paired repeats; ratio of medians {r['throughput_ratio_of_medians']:.3f}; "
            f">= {THROUGHPUT_GOAL}: {met}), p99 {r['taskserve_p99_ms']:.1f} vs {r['peer_p99_ms']:.1f} ms ({p99})"
        )
    for line in lines:
        print(line)
    return {"ratios": ratios}, lines
