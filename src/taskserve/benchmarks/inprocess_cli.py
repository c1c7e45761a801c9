"""``taskserve-bench in-process``: the batch-size sweep of the ONNX Runtime ceiling, written as results."""

from __future__ import annotations

import argparse
from pathlib import Path

from taskserve.benchmarks.cli_args import payload_from_args, plan_from
from taskserve.benchmarks.inprocess import BUCKETED_LABEL, SERVER_LABEL, InProcessModel, best_batch, run_in_process
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import LatencySummary, RunResult


def run_in_process_cli(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    model_dir: Path = args.model_repository / args.model
    if not model_dir.is_dir():
        raise SystemExit(f"{model_dir} is not a model directory")
    model = InProcessModel(model_dir, args.model_version, args.instances)
    try:
        # Requests of one item each: the sweep stacks them into batches like the server's batcher.
        args.batch_size = 1
        payload = payload_from_args(args, model.input_specs, model_dir)
        # Both baselines: batches within the length buckets (the server's work) and consecutive requests.
        runs = [
            r for bucketed in (True, False)
            for r in run_in_process(
                model, payload.requests, args.batch_sizes, plan_from(args), progress=not args.quiet, bucketed=bucketed
            )
        ]  # fmt: skip
    finally:
        model.close()
    best = best_batch([r for r in runs if r.server == BUCKETED_LABEL])
    plain = best_batch([r for r in runs if r.server == SERVER_LABEL])
    lat = LatencySummary.of(best.latencies_s)
    best_info = {
        "batch_size": int(best.load),
        "items_per_s": round(best.items_per_s, 2),
        "batch_latency_p50_ms": round(lat.p50, 3),
    }
    config = {
        "mode": "in-process", "model": args.model, "model_file": str(model.path), "runtime": model.description,
        "instances": len(model.runtimes), "intra_op_threads": model.config.runtime.intra_op_threads or "auto",
        "payload": payload.description, "batch_sizes": args.batch_sizes, "plan": vars(plan_from(args)),
    }  # fmt: skip
    notes = [
        (
            f"length-bucketed (the server's batches): best batch size {best_info['batch_size']}: "
            f"{best_info['items_per_s']} items/s "
            f"(batch latency p50 {best_info['batch_latency_p50_ms']} ms)"
        ),
        f"without length bucketing (consecutive requests): best batch size {int(plain.load)}, "
        f"{plain.items_per_s:.1f} items/s",
        "latency columns are per batch; throughput counts items",
    ]
    name = args.name or f"in-process-{args.model}"
    paths = write_results(
        name,
        runs,
        config=config,
        machine=machine_info(),
        out_dir=args.out,
        extra={"best": best_info},
        notes=notes,
    )
    print(notes[0])
    return runs, paths
