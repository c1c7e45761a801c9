"""``taskserve-bench closed|open``: one server, one model, a sweep of concurrencies or rates."""

from __future__ import annotations

import argparse
from pathlib import Path

from taskserve.benchmarks.cli_args import payload_from_args, plan_from
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import RunResult
from taskserve.benchmarks.sweep import SweepTarget, run_sweep
from taskserve.benchmarks.targets import TYPED_TASKS, bench_channel, typed_call, v2_call
from taskserve.clients import AsyncTaskServeClient
from taskserve.clients.metadata import TensorMetadata
from taskserve.clients.options import ClientOptions


async def run_server_load(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    if args.protocol == "typed" and args.task not in TYPED_TASKS:
        raise SystemExit(f"--protocol typed needs --task, one of {sorted(TYPED_TASKS)}")
    model_dir = args.model_repository / args.model if args.model_repository else None
    channel = bench_channel(args.target, args.timeout)
    try:
        client = AsyncTaskServeClient(args.target, ClientOptions(timeout_s=args.timeout), channel=channel)
        await client.wait_until_ready(args.model, timeout=args.startup_timeout)
        specs: list[TensorMetadata] = []
        if args.protocol == "v2" and not args.payload.endswith(".npz"):
            specs = list((await client.model_metadata(args.model, args.model_version)).inputs)
            if not specs:
                raise SystemExit(f"the server reports no inputs for {args.model!r}; pass --payload FILE.npz")
        elif args.protocol == "typed" and args.payload == "auto":
            args.payload = "text" if TYPED_TASKS[args.task].needs == "texts" else "image"
        payload = payload_from_args(args, specs, model_dir)

        if args.protocol == "v2":
            call = v2_call(channel, args.model, args.model_version, payload, args.timeout)
        else:
            call = typed_call(channel, args.task, args.model, args.model_version, payload, args.timeout)

        loads = args.concurrency if args.command == "closed" else args.rate
        target = SweepTarget(args.label, call)
        runs = await run_sweep(
            [target], args.command, loads, plan_from(args),
            items_per_request=payload.batch_size, seed=args.seed, progress=not args.quiet,
        )  # fmt: skip
    finally:
        await channel.close()
    name = args.name or f"{args.command}-{args.model}"
    config = {
        "mode": args.command, "target": args.target, "model": args.model, "protocol": args.protocol,
        "task": args.task, "payload": payload.description, "batch_size": payload.batch_size,
        "loads": loads, "timeout_s": args.timeout, "plan": vars(plan_from(args)),
    }  # fmt: skip
    paths = write_results(name, runs, config=config, machine=machine_info(), out_dir=args.out)
    return runs, paths
