"""``taskserve-bench layouts``: does one configuration serve every load? (issue 15)

Targets, for the model's own config.yaml (the demo MiniLM: two one-thread instances
plus ``wide_when_alone``), measured in one run:

* concurrency 1: taskserve's p50 <= a bare batch-1 ``session.run`` p50 on a session
  with every core (onnxruntime's default options) + 1 ms;
* concurrency 32: taskserve's throughput >= ``taskserve-narrow``'s, the same config
  without ``wide_when_alone`` (two instances of one thread each: the layout that
  wins under load), within the run's ``--tolerance``.

Each repeat measures the bare session in this process (the servers idle, started),
then both servers at concurrency 1 and 32, alternating; verdicts come from medians
over repeats and only from stable, error-free runs.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskserve.benchmarks.cli_args import add_measurement_args, add_payload_args, payload_from_args, plan_from
from taskserve.benchmarks.loadgen import Recorder, WindowPlan
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.payloads import Request
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import LatencySummary, RunResult, Window, choose_measured, is_stable

SERVERS = ("taskserve", "taskserve-narrow")
LATENCY_SLACK_MS = 1.0


def bare_label(threads: int) -> str:
    return f"bare session.run, {threads} threads"


def measure_bare(model_file: Path, requests: Sequence[Request], plan: WindowPlan, threads: int) -> list[Window]:
    """Batch-1 ``session.run`` back to back on one session of ``threads`` threads, default options."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_file), sess_options=opts, providers=["CPUExecutionProvider"])
    rec = Recorder(1)
    windows: list[Window] = []
    i = 0
    next_cut = time.perf_counter() + plan.warmup_s
    warm = True
    while len(windows) < plan.max_windows:
        start = time.perf_counter()
        session.run(None, dict(requests[i % len(requests)]))
        rec.ok(time.perf_counter() - start)
        i += 1
        if start >= next_cut:
            window = rec.take()
            if warm:
                warm = False
            else:
                windows.append(window)
                if is_stable(windows, plan.stable_windows, plan.tolerance):
                    break
            next_cut = time.perf_counter() + plan.window_s
    return windows


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdicts(runs: list[RunResult], bare: str, tolerance: float) -> tuple[dict[str, object], list[str]]:
    """The two targets from medians over repeats; no verdict from unusable runs."""

    def pick(server: str, load: float) -> list[RunResult]:
        return [r for r in runs if r.server == server and r.load == load]

    bare_runs = [r for r in runs if r.server == bare]
    c1, c32 = pick("taskserve", 1), pick("taskserve", 32)
    narrow32 = pick("taskserve-narrow", 32)
    figures: dict[str, object] = {
        "bare_batch1_p50_ms": round(_median([LatencySummary.of(r.latencies_s).p50 for r in bare_runs]), 3),
        "taskserve_c1_p50_ms": round(_median([LatencySummary.of(r.latencies_s).p50 for r in c1]), 3),
        "taskserve_narrow_c1_p50_ms": round(
            _median([LatencySummary.of(r.latencies_s).p50 for r in pick("taskserve-narrow", 1)]), 3
        ),
        "taskserve_c32_items_per_s": round(_median([r.items_per_s for r in c32]), 1),
        "taskserve_narrow_c32_items_per_s": round(_median([r.items_per_s for r in narrow32]), 1),
    }
    paired = [
        a.items_per_s / b.items_per_s
        for a in c32 for b in narrow32 if a.repeat == b.repeat and b.items_per_s > 0
    ]  # fmt: skip
    figures["c32_throughput_ratio_paired_median"] = round(_median(paired), 3)
    lines = []
    latency_runs, throughput_runs = bare_runs + c1, c32 + narrow32
    for name, involved, met, text in (
        (
            "c1_p50",
            latency_runs,
            float(figures["taskserve_c1_p50_ms"]) <= float(figures["bare_batch1_p50_ms"]) + LATENCY_SLACK_MS,  # type: ignore[arg-type]
            f"concurrency 1 p50 {figures['taskserve_c1_p50_ms']} ms vs bare batch-1 session.run "
            f"{figures['bare_batch1_p50_ms']} ms + {LATENCY_SLACK_MS:g} ms",
        ),
        (
            "c32_throughput",
            throughput_runs,
            float(figures["c32_throughput_ratio_paired_median"]) >= 1 - tolerance,  # type: ignore[arg-type]
            f"concurrency 32 throughput {figures['taskserve_c32_items_per_s']} vs two narrow instances "
            f"{figures['taskserve_narrow_c32_items_per_s']} items/s (paired ratio "
            f"{figures['c32_throughput_ratio_paired_median']}; >= 1 within the {tolerance:.0%} tolerance)",
        ),
    ):
        unusable = sorted({why for r in involved if (why := r.unusable)})
        verdict = f"no verdict ({'; '.join(unusable)})" if unusable else ("met" if met else "NOT met")
        figures[f"{name}_verdict"] = verdict
        lines.append(f"{text}: {verdict}")
    return figures, lines


def run_layouts(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    from taskserve.benchmarks.peer_compare import _sweep, model_under_test, start_servers
    from taskserve.server.runtimes.onnx_threads import usable_cores

    args.servers, args.concurrency, args.mode = ",".join(SERVERS), [1, 32], "closed"
    mut, probe = model_under_test(args)
    try:
        payload = payload_from_args(args, probe.input_specs, mut.model_dir)
    finally:
        probe.close()
    plan, threads = plan_from(args), usable_cores()
    bare = bare_label(threads)
    log_dir = Path(tempfile.mkdtemp(prefix="taskserve-layouts-logs-"))
    peers = start_servers(list(SERVERS), mut, args, log_dir, mlserver_batching=False)
    one_sweep = argparse.Namespace(**{**vars(args), "repeats": 1})  # repeats are this loop's
    runs: list[RunResult] = []
    try:
        for repeat in range(args.repeats):
            windows = measure_bare(mut.onnx_file, payload.requests, plan, threads)
            measured, stable = choose_measured(windows, plan.stable_windows, plan.tolerance)
            runs.append(RunResult(bare, "in-process", 1, 1, tuple(windows), measured, stable, repeat))
            swept = asyncio.run(_sweep(peers, one_sweep, payload))
            runs += [dataclasses.replace(r, repeat=repeat) for r in swept]
    finally:
        for peer in peers:
            peer.stop()
    figures, lines = verdicts(runs, bare, args.tolerance)
    for line in lines:
        print(line)
    config: dict[str, Any] = {
        "mode": "layouts", "model": mut.name, "model_file": str(mut.onnx_file), "payload": payload.description,
        "servers": {p.name: p.version for p in peers}, "bare_session_threads": threads, "repeats": args.repeats,
        "plan": vars(plan), "server_logs": str(log_dir),
    }  # fmt: skip
    notes = [
        f"taskserve: the model's config.yaml; taskserve-narrow: the same without wide_when_alone; {bare}: "
        "onnxruntime's default session options, batch-1 runs back to back in this process, no server",
        *lines,
    ]
    paths = write_results(
        args.name or f"layouts-{mut.name}", runs, config=config, machine=machine_info(), out_dir=args.out,
        extra={"figures": figures}, notes=notes,
    )  # fmt: skip
    return runs, paths


def build_parser(sub: Any) -> None:
    p = sub.add_parser("layouts", help="one config for every load: c=1 p50 vs a bare session, c=32 vs narrow")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--model-version", default="")
    p.add_argument("--repeats", type=int, default=3, help="bare + both servers at c=1 and c=32, this many times")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--peer-intra-op-threads", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--kserve-venv", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--mlserver-venv", type=Path, default=None, help=argparse.SUPPRESS)
    add_payload_args(p)
    add_measurement_args(p)
