"""Write a benchmark's results: ``<name>.json`` (everything), ``<name>.md`` (a table) and
``<name>.png`` (latency versus throughput, one line per server)."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from taskserve.benchmarks.stats import LatencySummary, RunResult

DEFAULT_OUT = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def load_label(mode: str, load: float) -> str:
    if mode == "closed":
        return f"concurrency {load:g}"
    if mode == "open":
        return f"{load:g} req/s offered"
    return f"batch {load:g}"


def _errors(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(errors.items())) or "0"


def markdown(name: str, meta: Mapping[str, object], runs: Sequence[RunResult], notes: Sequence[str] = ()) -> str:
    machine = meta.get("machine", {})
    assert isinstance(machine, Mapping)
    lines = [
        f"# {name}",
        "",
        f"- created: {meta.get('created_utc')}",
        (
            f"- machine: {machine.get('cpu_model')}, {machine.get('cpus_usable')} usable cores, "
            f"{machine.get('memory_gib')} GiB, Python {machine.get('python')}"
        ),
        f"- git commit: {machine.get('git_commit')}"
        f"{' (DIRTY: measured with uncommitted changes, --allow-dirty)' if machine.get('git_dirty') else ''}",
    ]
    config = meta.get("config", {})
    assert isinstance(config, Mapping)
    lines += [f"- {k}: {v}" for k, v in config.items()]
    lines += [f"- {n}" for n in notes]
    lines += [
        "",
        "Latencies are of successful requests; failed ones are counted under errors, with their own p50.",
        "",
        "| server | load | repeat | req/s | items/s | p50 ms | p90 ms | p95 ms | p99 ms | max ms | errors "
        "| failed p50 ms | stable |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in runs:
        lat = LatencySummary.of(r.latencies_s)
        failed = f"{LatencySummary.of(r.failure_latencies_s).p50:.2f}" if r.failure_latencies_s else "-"
        lines.append(
            f"| {r.server} | {load_label(r.mode, r.load)} | {r.repeat} | {r.throughput_rps:.1f} | "
            f"{r.items_per_s:.1f} | {lat.p50:.2f} | {lat.p90:.2f} | {lat.p95:.2f} | "
            f"{lat.p99:.2f} | {lat.max:.2f} | {_errors(r.errors)} | {failed} | {'yes' if r.stable else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, title: str, runs: Sequence[RunResult]) -> None:
    """p50 (solid) and p99 (dashed) latency against achieved items/s; repeats averaged per load."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt

    by_server: dict[str, dict[float, list[RunResult]]] = defaultdict(lambda: defaultdict(list))
    for r in runs:
        if r.latencies_s:  # a run where every call failed has no latency to draw
            by_server[r.server][r.load].append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (server, loads) in enumerate(sorted(by_server.items())):
        color = f"C{i}"
        xs, p50s, p99s = [], [], []
        for load in sorted(loads):
            reps = loads[load]
            xs.append(sum(r.items_per_s for r in reps) / len(reps))
            lats = [LatencySummary.of(r.latencies_s) for r in reps]
            p50s.append(sum(lat.p50 for lat in lats) / len(lats))
            p99s.append(sum(lat.p99 for lat in lats) / len(lats))
        ax.plot(xs, p50s, "o-", color=color, label=f"{server} p50")
        ax.plot(xs, p99s, "s--", color=color, alpha=0.7, label=f"{server} p99")
    ax.set_xlabel("throughput (items/s)")
    ax.set_ylabel("latency (ms)")
    if by_server:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if by_server:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no successful requests", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(
    name: str,
    runs: Sequence[RunResult],
    *,
    config: Mapping[str, object],
    machine: Mapping[str, object],
    out_dir: Path = DEFAULT_OUT,
    extra: Mapping[str, object] | None = None,
    notes: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the three files; returns their paths by suffix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "name": name,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": dict(machine),
        "config": dict(config),
    }
    doc = {**meta, **(extra or {}), "notes": list(notes), "runs": [r.to_json() for r in runs]}
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md", "png": out_dir / f"{name}.png"}
    paths["json"].write_text(json.dumps(doc, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(name, meta, runs, notes))
    if runs:
        plot(paths["png"], name, runs)
    else:
        del paths["png"]
    return paths
