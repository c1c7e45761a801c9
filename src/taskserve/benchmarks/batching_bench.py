"""``taskserve-bench batching``: the dynamic batcher's three targets, measured in one run.

One taskserve process serves the same ONNX model twice: ``<model>-batched`` with the
model's own dynamic-batching config, ``<model>-unbatched`` with ``max_batch_size: 1``.
Each repeat measures the in-process ONNX Runtime ceiling (same model, same thread
settings, best batch size, no server) twice: with batches formed within the
config's length buckets as the server forms them (the same work: the target's
baseline) and with consecutive requests stacked as they come (more padding:
reported beside it), then concurrency 32 and 1 against both
entries, alternating, over the KServe v2 protocol. The ratios come from the medians
over repeats, so the machine's drift between minutes spreads over every side.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from taskserve.benchmarks.cli_args import add_measurement_args, add_payload_args, int_list, plan_from
from taskserve.benchmarks.inprocess import BUCKETED_LABEL, SERVER_LABEL, InProcessModel, best_batch, run_in_process
from taskserve.benchmarks.loadgen import WindowPlan
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.payloads import Payload, build_payload
from taskserve.benchmarks.peer_servers import PeerProcess, link_tree, spawn_taskserve
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import LatencySummary, RunResult
from taskserve.benchmarks.sweep import SweepTarget, run_sweep
from taskserve.benchmarks.targets import bench_channel, v2_call

# Targets from the issue: (ratio name, goal, True when higher is better).
TARGETS = {
    "batched_c32_vs_inprocess_ceiling": (0.9, True),
    "batched_vs_unbatched_c32_throughput": (1.4, True),
    "batched_vs_unbatched_c1_p50": (1.1, False),
}


def add_batching_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, required=True, help="repository holding the model")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--concurrency", type=int, default=32, help="the high-load point (default 32)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 16, 32, 64], help="in-process sweep")
    p.add_argument("--repeats", type=int, default=2, help="times each side is measured (default 2)")
    p.add_argument("--startup-timeout", type=float, default=180.0)


def write_variant_repository(model_dir: Path, model: str, root: Path) -> Path:
    """A repository with the model as-is and a copy whose batching is off (max_batch_size 1)."""
    repo = root / "repository"
    batched = repo / f"{model}-batched"
    unbatched = repo / f"{model}-unbatched"
    for entry in (batched, unbatched):
        entry.mkdir(parents=True)
        for item in model_dir.iterdir():
            if item.name != "config.yaml":
                link_tree(item, entry / item.name)
    config: dict[str, Any] = yaml.safe_load((model_dir / "config.yaml").read_text()) or {}
    (batched / "config.yaml").write_text(yaml.safe_dump({**config, "name": batched.name}, sort_keys=False))
    dynamic = {k: v for k, v in (config.get("dynamic_batching") or {}).items() if k != "preferred_batch_sizes"}
    off = {**config, "name": unbatched.name, "max_batch_size": 1, "dynamic_batching": dynamic}
    (unbatched / "config.yaml").write_text(yaml.safe_dump(off, sort_keys=False))
    return repo


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratios(runs: Sequence[RunResult], model: str, concurrency: int) -> dict[str, float]:
    """The three target ratios from medians over repeats."""

    def pick(server: str, load: float) -> list[RunResult]:
        return [r for r in runs if r.server == server and r.load == load and r.mode == "closed"]

    def ceiling_of(label: str) -> float:
        best: dict[int, float] = {}
        for r in runs:
            if r.mode == "in-process" and r.server == label:
                best[r.repeat] = max(best.get(r.repeat, 0.0), r.items_per_s)
        return _median(list(best.values()))

    batched, unbatched = f"{model}-batched", f"{model}-unbatched"
    thr_b = _median([r.throughput_rps for r in pick(batched, concurrency)])
    thr_u = _median([r.throughput_rps for r in pick(unbatched, concurrency)])
    p50_b = _median([LatencySummary.of(r.latencies_s).p50 for r in pick(batched, 1)])
    p50_u = _median([LatencySummary.of(r.latencies_s).p50 for r in pick(unbatched, 1)])
    ceiling, unbucketed = ceiling_of(BUCKETED_LABEL), ceiling_of(SERVER_LABEL)
    return {
        "inprocess_ceiling_items_per_s": round(ceiling, 1),
        "inprocess_ceiling_unbucketed_items_per_s": round(unbucketed, 1),
        "batched_c32_items_per_s": round(thr_b, 1),
        "unbatched_c32_items_per_s": round(thr_u, 1),
        "batched_c1_p50_ms": round(p50_b, 3),
        "unbatched_c1_p50_ms": round(p50_u, 3),
        "batched_c32_vs_inprocess_ceiling": round(thr_b / ceiling, 3),
        "batched_c32_vs_inprocess_ceiling_unbucketed": round(thr_b / unbucketed, 3),
        "batched_vs_unbatched_c32_throughput": round(thr_b / thr_u, 3),
        "batched_vs_unbatched_c1_p50": round(p50_b / p50_u, 3),
    }


def verdicts(measured: dict[str, float]) -> dict[str, str]:
    out = {}
    for name, (goal, higher) in TARGETS.items():
        value = measured[name]
        met = value >= goal if higher else value <= goal
        out[name] = f"{value:.3f} ({'>=' if higher else '<='} {goal}: {'met' if met else 'NOT met'})"
    return out


async def _server_sweep(
    peer: PeerProcess, model: str, payload: Payload, concurrency: int, plan: WindowPlan, repeat: int, timeout: float
) -> list[RunResult]:
    channel = bench_channel(peer.address, timeout)
    try:
        targets = [
            SweepTarget(name, v2_call(channel, name, "", payload, timeout))
            for name in (f"{model}-batched", f"{model}-unbatched")
        ]
        runs = await run_sweep(targets, "closed", [concurrency, 1], plan, items_per_request=1, seed=repeat)
    finally:
        await channel.close()
    return [_with_repeat(r, repeat) for r in runs]


def _with_repeat(run: RunResult, repeat: int) -> RunResult:
    return replace(run, repeat=repeat)


def run_batching(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    model_dir: Path = args.model_repository / args.model
    if not (model_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model entry (no config.yaml); build it with taskserve-export")
    plan = plan_from(args)
    work = Path(tempfile.mkdtemp(prefix="taskserve-batching-"))
    try:
        repo = write_variant_repository(model_dir, args.model, work)
        inproc = InProcessModel(model_dir)
        payload = build_payload(
            "text", inproc.input_specs, batch_size=1, count=args.num_requests, min_tokens=args.min_tokens,
            max_tokens=args.max_tokens, model_dir=model_dir, seed=args.seed,
        )  # fmt: skip
        peer = spawn_taskserve(repo, work)
        runs: list[RunResult] = []
        try:
            peer.wait_ready(f"{args.model}-unbatched", args.startup_timeout)
            peer.wait_ready(f"{args.model}-batched", args.startup_timeout)
            for repeat in range(args.repeats):
                for bucketed in (True, False):
                    inproc_runs = run_in_process(
                        inproc, payload.requests, args.batch_sizes, plan, progress=not args.quiet, bucketed=bucketed
                    )
                    runs += [_with_repeat(r, repeat) for r in inproc_runs]
                runs += asyncio.run(
                    _server_sweep(peer, args.model, payload, args.concurrency, plan, repeat, args.timeout)
                )
        finally:
            peer.stop()
            inproc.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    measured = ratios(runs, args.model, args.concurrency)
    best = best_batch([r for r in runs if r.server == BUCKETED_LABEL])
    plain = best_batch([r for r in runs if r.server == SERVER_LABEL])
    notes = [
        f"ceiling: in-process onnxruntime, batches within length buckets as the server forms them, best batch "
        f"size {best.load:g} ({inproc.description}); the target's baseline",
        f"ceiling without bucketing (consecutive requests padded to the longest): best batch size {plain.load:g}, "
        f"ratio batched c{args.concurrency} / it: {measured['batched_c32_vs_inprocess_ceiling_unbucketed']:.3f}",
        *(f"{k}: {v}" for k, v in verdicts(measured).items()),
    ]
    config = {
        "mode": "batching", "model": args.model, "payload": payload.description, "concurrency": args.concurrency,
        "batch_sizes": args.batch_sizes, "repeats": args.repeats, "plan": vars(plan),
    }  # fmt: skip
    name = args.name or f"batching-{args.model}"
    paths = write_results(
        name, runs, config=config, machine=machine_info(), out_dir=args.out,
        extra={"ratios": measured, "targets": {k: v[0] for k, v in TARGETS.items()}}, notes=notes,
    )  # fmt: skip
    return runs, paths


def build_parser(sub: Any) -> None:
    p = sub.add_parser("batching", help="dynamic batcher targets: batched vs unbatched vs in-process ceiling")
    add_batching_args(p)
    add_payload_args(p)
    add_measurement_args(p)
    p.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
