"""``taskserve-bench peers``: taskserve, KServe, MLServer and a bare echo server, one model, one client.

Every server serves the same ONNX file on 127.0.0.1. Each peer runs twice: at
its default settings (``kserve``, ``mlserver``: one session with a thread per
core unless ``--peer-intra-op-threads`` says otherwise) and at its best setting
here, the headline (``kserve-tuned``: one single-thread session per core side by
side; ``mlserver-tuned``: adaptive batching where the workload allows it, and
``--mlserver-tuned-workers`` worker processes). taskserve runs its config.yaml;
``taskserve-threaded`` is the same with ``inline_compute_us: 0`` (every batch on
an instance thread) and ``taskserve-narrow`` without ``wide_when_alone``. The same pre-encoded
v2 requests go to each; servers alternate at every load point and the whole
sweep repeats (``--repeats``, at least 2), so each point is measured on each
server more than once. ``--server-starts N`` runs all of that N times, each
with freshly started servers: on this machine two identical server processes
can differ by ~8 % in p50 at concurrency 1 for the whole of their life (where
the scheduler puts their threads), so a comparison of latencies this small
needs several processes of each server, not only several repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
from collections.abc import Callable
from pathlib import Path

from taskserve.benchmarks.cli_args import float_list, int_list, payload_from_args, plan_from
from taskserve.benchmarks.inprocess import InProcessModel
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.payloads import Payload
from taskserve.benchmarks.peer_servers import (
    REPO_ROOT,
    ModelUnderTest,
    PeerProcess,
    start_echo,
    start_kserve,
    start_mlserver,
    start_taskserve,
)
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import RunResult
from taskserve.benchmarks.sweep import SweepTarget, run_sweep
from taskserve.benchmarks.targets import bench_channel, v2_call

SERVERS = (
    "taskserve", "taskserve-threaded", "taskserve-narrow",
    "kserve", "kserve-tuned", "mlserver", "mlserver-tuned", "echo",
)  # fmt: skip
DEFAULT_SERVERS = ("taskserve", "kserve-tuned", "kserve", "mlserver-tuned", "mlserver", "echo")
# taskserve variants: config.yaml overrides.
TASKSERVE_VARIANTS: dict[str, dict[str, object]] = {
    "taskserve": {},
    "taskserve-threaded": {"dynamic_batching": {"inline_compute_us": 0}},
    "taskserve-narrow": {"runtime": {"wide_when_alone": False}},
}


def add_peer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peers")
    g.add_argument("--model-repository", type=Path, required=True, help="taskserve repository holding the model")
    g.add_argument("--model", required=True)
    g.add_argument("--model-version", default="")
    g.add_argument(
        "--servers", default=",".join(DEFAULT_SERVERS), help=f"comma-separated subset of {','.join(SERVERS)}"
    )
    g.add_argument("--mode", choices=("closed", "open"), default="closed")
    g.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="closed loop, e.g. 1,8,32")
    g.add_argument("--rate", type=float_list, default=[50, 100, 200], help="open loop, requests/s")
    g.add_argument("--repeats", type=int, default=2, help="sweeps over all servers (default 2)")
    g.add_argument(
        "--server-starts", type=int, default=1,
        help="start every server anew this many times, repeating the sweeps for each start (default 1)",
    )  # fmt: skip
    g.add_argument("--kserve-venv", type=Path, default=REPO_ROOT / ".venv-kserve")
    g.add_argument("--mlserver-venv", type=Path, default=REPO_ROOT / ".venv-mlserver")
    g.add_argument("--mlserver-workers", type=int, default=1, help="mlserver's parallel_workers (default 1, its own)")
    g.add_argument(
        "--mlserver-tuned-workers", type=int, default=0,
        help="mlserver-tuned's parallel_workers, each session with cores / workers threads (default: one per core)",
    )  # fmt: skip
    g.add_argument(
        "--peer-intra-op-threads", type=int, default=0,
        help="onnxruntime intra-op threads of the peers' one session (default 0: one per core, "
        "what a one-session server uses); taskserve uses its config.yaml",
    )  # fmt: skip
    g.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds")
    g.add_argument("--startup-timeout", type=float, default=180.0, help="seconds each server gets to become ready")


def model_under_test(args: argparse.Namespace) -> tuple[ModelUnderTest, InProcessModel]:
    from taskserve.server.runtimes.onnx import default_intra_op_threads

    model_dir: Path = args.model_repository / args.model
    probe = InProcessModel(model_dir, args.model_version, instances=1)
    config = probe.config
    mut = ModelUnderTest(
        name=args.model,
        model_dir=model_dir,
        onnx_file=probe.path.resolve(),
        # The peers hold one session each: by default they get every core, as onnxruntime would give them.
        intra_op_threads=args.peer_intra_op_threads or default_intra_op_threads(1),
        inter_op_threads=config.runtime.inter_op_threads,
        max_batch_size=config.max_batch_size,
        max_batch_delay_us=config.dynamic_batching.max_queue_delay_us,
    )
    return mut, probe


def _same_shapes(payload: Payload) -> bool:
    shapes = {tuple((k, v.shape) for k, v in sorted(r.items())) for r in payload.requests}
    return len(shapes) == 1


def start_servers(
    names: list[str], mut: ModelUnderTest, args: argparse.Namespace, log_dir: Path, mlserver_batching: bool
) -> list[PeerProcess]:
    from taskserve.server.runtimes.onnx_threads import usable_cores

    cores = usable_cores()
    peers: list[PeerProcess] = []
    try:
        for name in names:
            if name in TASKSERVE_VARIANTS:
                peers.append(start_taskserve(mut, log_dir, name, TASKSERVE_VARIANTS[name]))
            elif name == "echo":
                peers.append(start_echo(log_dir))
            elif name == "kserve":
                peers.append(start_kserve(mut, args.kserve_venv, log_dir))
            elif name == "kserve-tuned":
                peers.append(start_kserve(mut, args.kserve_venv, log_dir, name, sessions=cores, threads=1))
            elif name == "mlserver":
                # Its defaults: adaptive batching off (MLServer turns it on only when configured).
                peers.append(start_mlserver(mut, args.mlserver_venv, log_dir, args.mlserver_workers, False))
            elif name == "mlserver-tuned":
                workers = args.mlserver_tuned_workers or cores
                tuned = dataclasses.replace(mut, intra_op_threads=max(1, cores // workers))
                peers.append(
                    start_mlserver(tuned, args.mlserver_venv, log_dir, workers, mlserver_batching, name)
                )
        for peer in peers:
            peer.wait_ready(mut.name, args.startup_timeout)
    except BaseException:
        for peer in peers:
            peer.stop()
        raise
    return peers


async def _sweep(peers: list[PeerProcess], args: argparse.Namespace, payload: Payload) -> list[RunResult]:
    channels = {p.name: bench_channel(p.address, args.timeout) for p in peers}

    targets = [
        SweepTarget(p.name, v2_call(channels[p.name], args.model, args.model_version, payload, args.timeout))
        for p in peers
    ]
    loads = args.concurrency if args.mode == "closed" else args.rate
    try:
        return await run_sweep(
            targets, args.mode, loads, plan_from(args), repeats=args.repeats,
            items_per_request=payload.batch_size, seed=args.seed, progress=not args.quiet,
        )  # fmt: skip
    finally:
        for ch in channels.values():
            await ch.close()


Summary = Callable[[list[RunResult]], tuple[dict[str, object], list[str]]]


def run_peers(args: argparse.Namespace, summarize: Summary | None = None) -> tuple[list[RunResult], dict[str, Path]]:
    """Run the sweep and write the results; ``summarize`` adds figures and notes computed from the runs."""
    from taskserve.server.runtimes.onnx import default_intra_op_threads

    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(SERVERS))
    if unknown or not names:
        raise SystemExit(f"unknown servers {unknown}; choose from {', '.join(SERVERS)}")
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1 (2 or more for a comparison)")
    if args.server_starts < 1:
        raise SystemExit("--server-starts must be >= 1")
    mut, probe = model_under_test(args)
    try:
        payload = payload_from_args(args, probe.input_specs, mut.model_dir)
    finally:
        probe.close()
    notes: list[str] = []
    mlserver_batching = _same_shapes(payload)
    if "mlserver-tuned" in names and not mlserver_batching:
        notes.append(
            "mlserver-tuned ran without adaptive batching: MLServer merges requests by concatenating their data "
            "under the first request's shape, so requests of different shapes (variable-length text) cannot share "
            "a batch; the --fixed-length run compares with it on"
        )
    log_dir = Path(tempfile.mkdtemp(prefix="taskserve-peers-logs-"))
    runs: list[RunResult] = []
    for start in range(args.server_starts):
        start_dir = log_dir / f"start-{start}" if args.server_starts > 1 else log_dir
        start_dir.mkdir(exist_ok=True)
        peers = start_servers(names, mut, args, start_dir, mlserver_batching)
        try:
            swept = asyncio.run(_sweep(peers, args, payload))
        finally:
            for peer in peers:
                peer.stop()
        # Repeats are numbered across starts, so each (server, repeat) is one measurement.
        runs += [dataclasses.replace(r, repeat=start * args.repeats + r.repeat) for r in swept]
        for peer in peers:
            notes.extend(n for n in peer.notes if n not in notes)
    config = {
        "mode": args.mode, "model": mut.name, "model_file": str(mut.onnx_file), "payload": payload.description,
        "batch_size": payload.batch_size, "loads": args.concurrency if args.mode == "closed" else args.rate,
        "repeats": args.repeats, "server_starts": args.server_starts, "servers": {p.name: p.version for p in peers},
        "onnxruntime_threads": {
            "peers": {"intra_op": mut.intra_op_threads, "inter_op": mut.inter_op_threads},
            "taskserve": {
                "instances": probe.config.instance_count,
                "intra_op": probe.config.runtime.intra_op_threads
                or default_intra_op_threads(probe.config.instance_count),
            },
        },
        "plan": vars(plan_from(args)), "server_logs": str(log_dir),
    }  # fmt: skip
    name = args.name or f"peers-{mut.name}"
    extra: dict[str, object] = {}
    if summarize is not None:
        extra, more_notes = summarize(runs)
        notes.extend(more_notes)
    paths = write_results(
        name, runs, config=config, machine=machine_info(), out_dir=args.out, extra=extra, notes=notes
    )
    return runs, paths
