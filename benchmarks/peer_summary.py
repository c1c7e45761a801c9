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

from taskserve.benchmarks.stats import LatencySummary, RunResult

THROUGHPUT_GOAL = 1.5
OURS = "taskserve"


def _headline_first(peer: str) -> tuple[int, str]:
    return (0 if peer.endswith("-tuned") else 1, peer)


def peer_ratios(runs: list[RunResult]) -> dict[str, dict[str, object]]:
    """Per "<peer> @ <load>": paired and median throughput ratios over usable pairs, the median
    p99s, and why pairs were left out of the verdict."""
    by_point: dict[tuple[float, int], dict[str, RunResult]] = defaultdict(dict)
    for run in runs:
        by_point[(run.load, run.repeat)][run.server] = run
    loads = sorted({load for load, _ in by_point})
    peers = sorted({r.server for r in runs} - {OURS}, key=_headline_first)
    out: dict[str, dict[str, object]] = {}
    for load in loads:
        points = [servers for (lo, _), servers in sorted(by_point.items()) if lo == load]
        for peer in peers:
            pairs = [(p[OURS], p[peer]) for p in points if OURS in p and peer in p]
            if not pairs:
                continue
            usable = [(a, b) for a, b in pairs if a.unusable is None and b.unusable is None]
            excluded = sorted({why for a, b in pairs for why in (a.unusable, b.unusable) if why})
            row: dict[str, object] = {
                "repeats": len(pairs),
                "usable_repeats": len(usable),
                "excluded_because": excluded,
                "taskserve_failed": sum(a.failed for a, _ in pairs),
                "peer_failed": sum(b.failed for _, b in pairs),
                "peer_zero_throughput": any(b.items_per_s == 0 for _, b in pairs),
            }
            if usable:
                paired = [a.items_per_s / b.items_per_s for a, b in usable]
                ours, theirs = [a for a, _ in usable], [b for _, b in usable]
                row.update({
                    "throughput_ratio_paired_median": round(statistics.median(paired), 3),
                    "throughput_ratio_of_medians": round(
                        statistics.median(a.items_per_s for a in ours) / statistics.median(b.items_per_s for b in theirs), 3
                    ),
                    "taskserve_p99_ms": round(statistics.median(LatencySummary.of(a.latencies_s).p99 for a in ours), 2),
                    "peer_p99_ms": round(statistics.median(LatencySummary.of(b.latencies_s).p99 for b in theirs), 2),
                })  # fmt: skip
            out[f"{peer} @ {load:g}"] = row
    return out


def verdict_line(key: str, r: dict[str, object]) -> str:
    peer = key.split(" @ ")[0]
    role = " (headline: the peer's best setting)" if peer.endswith("-tuned") else ""
    failures = f"; failed requests taskserve {r['taskserve_failed']}, {peer} {r['peer_failed']}"
    if r["peer_zero_throughput"]:
        failures += f"; ERROR: {peer} served nothing in at least one repeat"
    if not r["usable_repeats"]:
        return f"taskserve / {key}{role}: no verdict, no stable error-free pair ({'; '.join(r['excluded_because'])}){failures}"  # type: ignore[arg-type]
    ratio = float(r["throughput_ratio_paired_median"])  # type: ignore[arg-type]
    met = "met" if ratio >= THROUGHPUT_GOAL else "NOT met"
    p99 = "lower" if float(r["taskserve_p99_ms"]) < float(r["peer_p99_ms"]) else "NOT lower"  # type: ignore[arg-type]
    left_out = f", {int(r['repeats']) - int(r['usable_repeats'])} left out" if r["usable_repeats"] != r["repeats"] else ""  # type: ignore[call-overload]
    return (
        f"taskserve / {key}{role}: throughput {ratio:.3f} (median of {r['usable_repeats']} stable error-free paired "
        f"repeats{left_out}; ratio of medians {r['throughput_ratio_of_medians']}; >= {THROUGHPUT_GOAL}: {met}), "
        f"p99 {r['taskserve_p99_ms']} vs {r['peer_p99_ms']} ms ({p99}){failures}"
    )


def summarize(runs: list[RunResult]) -> tuple[dict[str, object], list[str]]:
    """Ratios and verdicts for the results files (and the terminal)."""
    ratios = peer_ratios(runs)
    lines = [verdict_line(key, r) for key, r in ratios.items()]
    for line in lines:
        print(line)
    return {"ratios": ratios}, lines
