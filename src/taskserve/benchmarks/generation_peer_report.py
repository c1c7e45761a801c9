"""The generation peer comparison's figures, verdicts, table and plot.

Per server and stream count: medians over the runs that can back a verdict (stable,
error-free, equal work); where there is none, the medians of all its runs are shown but
marked, and every target that needs that point says "no verdict" and why. The targets are
issue 21's: one stream of taskserve int4 against llama.cpp's Q4_1, and at the largest stream
count taskserve's best variant against the best peer (tokens/s), its TTFT p50 against the
peers' lowest, its inter-token p99 against its own p50, and the cores it keeps busy.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from taskserve.benchmarks.stats import RunResult

OURS = ("taskserve", "taskserve-int8", "taskserve-int4")
METRICS = ("tokens_per_s", "ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms", "itl_p99_ms", "cores_busy")
# Flags that decide which kernels the servers can use (AMX, VNNI, BF16, AVX-512).
FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse4")

Point = dict[str, Any]
Usable = Callable[[RunResult], str | None]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return sorted(f for f in line.split(":", 1)[1].split() if f.startswith(FLAG_PREFIXES))
    except OSError:
        pass
    return []


def points(runs: Sequence[RunResult], usable: Usable) -> dict[str, dict[int, Point]]:
    by: dict[str, dict[int, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        by[r.server][int(r.load)].append(r)
    out: dict[str, dict[int, Point]] = {}
    for server, loads in by.items():
        out[server] = {}
        for load, group in sorted(loads.items()):
            good = [r for r in group if usable(r) is None]
            basis = good or group
            point: Point = {m: round(statistics.median(float(r.extra[m]) for r in basis), 3) for m in METRICS}
            point.update(
                runs=len(group), usable_runs=len(good), errors=sum(r.failed for r in group),
                excluded_because=sorted({why for r in group if (why := usable(r)) is not None}),
                equal_work=sorted({str(r.extra["equal_work"]) for r in group}),
            )  # fmt: skip
            out[server][load] = point
    return out


def _best(pts: Mapping[str, Mapping[int, Point]], names: Sequence[str], load: int) -> tuple[str, Point] | None:
    """The fastest of ``names`` at ``load`` among points with usable runs."""
    found = [(n, pts[n][load]) for n in names if load in pts.get(n, {}) and pts[n][load]["usable_runs"]]
    return max(found, key=lambda item: float(item[1]["tokens_per_s"])) if found else None


def _why_not(pts: Mapping[str, Mapping[int, Point]], names: Sequence[str], load: int) -> str:
    reasons = [
        r for n in names for r in (pts[n][load]["excluded_because"] if load in pts.get(n, {}) else [f"{n}: not run"])
    ]
    return "; ".join(reasons)


def _verdict(name: str, value: float | None, goal: float, higher: bool, why: str) -> tuple[dict[str, Any], str]:
    if value is None:
        return {"value": None, "goal": goal, "met": None, "why": why}, f"{name}: no verdict ({why})"
    met = value >= goal if higher else value <= goal
    sign = ">=" if higher else "<="
    return (
        {"value": round(value, 3), "goal": goal, "met": met, "basis": why},
        f"{name}: {value:.2f} ({sign} {goal:g}: {'met' if met else 'MISSED'}; {why})",
    )


def summarize(runs: Sequence[RunResult], usable: Usable, cores: int = 2) -> tuple[dict[str, Any], list[str]]:
    """Figures per server and stream count, the targets' verdicts, and their lines."""
    pts = points(runs, usable)
    peers = sorted(set(pts) - set(OURS))
    loads = sorted({int(r.load) for r in runs})
    targets: dict[str, dict[str, Any]] = {}
    lines: list[str] = []

    def add(name: str, value: float | None, goal: float, higher: bool, why: str) -> None:
        targets[name], line = _verdict(name, value, goal, higher, why)
        lines.append(line)

    for load in loads:  # taskserve's best over the best peer at every stream count (no goal but the top one)
        ours, theirs = _best(pts, OURS, load), _best(pts, peers, load)
        if ours and theirs:
            ratio = float(ours[1]["tokens_per_s"]) / float(theirs[1]["tokens_per_s"])
            lines.append(f"tokens/s at {load} streams: {ours[0]} / {theirs[0]} = {ratio:.2f} (medians of usable runs)")
    if 1 in loads and "llama.cpp-q4_1" in pts:
        pair = ("taskserve-int4", "llama.cpp-q4_1")
        a, b = (pts.get(n, {}).get(1) for n in pair)
        if a and b and a["usable_runs"] and b["usable_runs"]:
            ratio = float(a["tokens_per_s"]) / float(b["tokens_per_s"])
            add("int4_1_stream_vs_llama_cpp_q4_1", ratio, 1.0, True, "taskserve-int4 / llama.cpp-q4_1 tokens/s")
        else:
            add("int4_1_stream_vs_llama_cpp_q4_1", None, 1.0, True, _why_not(pts, pair, 1))
    top = max(loads, default=0)
    if top > 1 and peers:
        ours, theirs = _best(pts, OURS, top), _best(pts, peers, top)
        why = _why_not(pts, [*OURS, *peers], top)
        if ours and theirs:
            add(f"best_taskserve_vs_best_peer_{top}_streams",
                float(ours[1]["tokens_per_s"]) / float(theirs[1]["tokens_per_s"]), 1.2, True,
                f"{ours[0]} / {theirs[0]} tokens/s")  # fmt: skip
            ttft_peers = [(n, pts[n][top]) for n in peers if top in pts[n] and pts[n][top]["usable_runs"]]
            lowest = min(ttft_peers, key=lambda item: float(item[1]["ttft_p50_ms"]))
            ours_ms, lowest_ms = float(ours[1]["ttft_p50_ms"]), float(lowest[1]["ttft_p50_ms"])
            add(f"ttft_p50_{top}_streams_vs_lowest_peer", ours_ms / max(lowest_ms, 1e-9), 1.0, False,
                f"{ours[0]} {ours_ms:.0f} ms / {lowest[0]} {lowest_ms:.0f} ms")  # fmt: skip
        else:
            add(f"best_taskserve_vs_best_peer_{top}_streams", None, 1.2, True, why)
            add(f"ttft_p50_{top}_streams_vs_lowest_peer", None, 1.0, False, why)
        mine = _best(pts, OURS, top)
        itl = float(mine[1]["itl_p99_ms"]) / max(float(mine[1]["itl_p50_ms"]), 1e-9) if mine else None
        add(f"itl_p99_over_p50_{top}_streams", itl, 1.5, False,
            f"{mine[0]}" if mine else _why_not(pts, OURS, top))  # fmt: skip
        add(f"cores_busy_{top}_streams", float(mine[1]["cores_busy"]) if mine else None, round(0.95 * cores, 2),
            True, f"{mine[0]}, of {cores} usable cores" if mine else _why_not(pts, OURS, top))  # fmt: skip
    figures = {"points": {s: {str(k): v for k, v in p.items()} for s, p in pts.items()}, "targets": targets}
    return figures, lines


def summary_table(figures: Mapping[str, Any]) -> str:
    rows = [
        "## Per server and stream count (medians of the runs that back a verdict; * none did: all runs)",
        "",
        "| server | streams | tokens/s | TTFT p50 ms | TTFT p90 ms | ITL p50 ms | ITL p99 ms | cores busy "
        "| usable runs | errors | equal work |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for server, loads in sorted(figures["points"].items()):
        for load, p in sorted(loads.items(), key=lambda item: int(item[0])):
            mark = "" if p["usable_runs"] else "*"
            rows.append(
                f"| {server} | {load} | {p['tokens_per_s']:.1f}{mark} | {p['ttft_p50_ms']:.0f} "
                f"| {p['ttft_p90_ms']:.0f} | {p['itl_p50_ms']:.1f} | {p['itl_p99_ms']:.1f} | {p['cores_busy']:.2f} "
                f"| {p['usable_runs']}/{p['runs']} | {p['errors']} | {'; '.join(p['equal_work'])} |"
            )
    return "\n".join(rows) + "\n"


def plot(path: Path, title: str, figures: Mapping[str, Any]) -> None:
    """Tokens/s, TTFT p50 and inter-token p99 against streams, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("tokens_per_s", "generated tokens/s"), ("ttft_p50_ms", "TTFT p50 (ms)"), ("itl_p99_ms", "ITL p99 (ms)"))
    for i, (server, loads) in enumerate(sorted(figures["points"].items())):
        xs = sorted(int(k) for k in loads)
        for ax, (metric, _) in zip(axes, panels, strict=True):
            ys = [float(loads[str(x)][metric]) for x in xs]
            ax.plot(xs, ys, "o-" if server in OURS else "s--", color=f"C{i}", label=server)
    loads = sorted({int(k) for by_load in figures["points"].values() for k in by_load})
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xticks(loads, [str(n) for n in loads])
        ax.minorticks_off()
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
