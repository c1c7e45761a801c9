"""taskserve-bench: load-test a v2 or taskserve server, measure the in-process ceiling, compare peers.

Subcommands:
  closed      closed loop: a concurrency sweep (--concurrency 1,8,32)
  open        open loop: a Poisson request-rate sweep (--rate 50,100,200)
  in-process  the ONNX Runtime ceiling for the same model, no server (--batch-sizes 1,8,32)
  peers       taskserve, KServe, MLServer (default and best settings) and the echo floor, alternating
  batching    the dynamic batcher's targets against the in-process ceiling (both baselines)
  floor       a tiny model: taskserve's p50 against a bare gRPC echo, inline and threaded paths
  layouts     one config for every load: c=1 p50 vs a bare session, c=32 vs narrow instances
  echo-server a bare grpc.aio v2 server answering with the request's bytes
  export      export benchmarks (taskserve.benchmarks.export_bench)
  generation  the generation engine: 1/8/32 streams, context length, TTFT, vs transformers generate;
              with --peer llama.cpp[,vllm]: against the peers' OpenAI servers, one load client
  doors       the OpenAI HTTP door vs typed gRPC on a generation model (1/8/32 streams, same client logic)
  embedding-doors  a sentence-embedding model through v2 gRPC, v2 REST, typed gRPC and /v1/embeddings
  image-generation  diffusion: step-level batching, server vs diffusers' pipeline in-process
  quantization  --weights int8/int4 quality against float32 on a real decoder (exporter's check)

Results go to benchmarks/results/<name>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from taskserve.benchmarks.cli_args import (
    add_measurement_args,
    add_payload_args,
    add_target_args,
    float_list,
    int_list,
)
from taskserve.benchmarks.report import load_label
from taskserve.benchmarks.stats import LatencySummary, RunResult
from taskserve.clients.errors import TaskServeError


def print_summary(runs: Sequence[RunResult], paths: dict[str, Path]) -> None:
    for r in runs:
        lat = LatencySummary.of(r.latencies_s)
        errors = sum(r.errors.values())
        print(
            f"{r.server:>24} {load_label(r.mode, r.load):>22} rep {r.repeat}: {r.items_per_s:9.1f} items/s"
            f"  p50 {lat.p50:8.2f} ms  p99 {lat.p99:8.2f} ms  errors {errors}{'' if r.stable else '  (not stable)'}"
        )
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskserve-bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    closed = sub.add_parser("closed", help="closed-loop concurrency sweep against a server")
    add_target_args(closed)
    closed.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="e.g. 1,8,32")
    add_payload_args(closed)
    add_measurement_args(closed)
    opened = sub.add_parser("open", help="open-loop Poisson request-rate sweep against a server")
    add_target_args(opened)
    opened.add_argument("--rate", type=float_list, default=[50, 100, 200], help="requests/s, e.g. 50,100,200")
    add_payload_args(opened)
    add_measurement_args(opened)
    inproc = sub.add_parser("in-process", help="ONNX Runtime ceiling for a repository model, no server")
    inproc.add_argument("--model-repository", type=Path, required=True)
    inproc.add_argument("--model", required=True)
    inproc.add_argument("--model-version", default="")
    inproc.add_argument("--batch-sizes", type=int_list, default=[1, 2, 4, 8, 16, 32], help="e.g. 1,8,32")
    inproc.add_argument("--instances", type=int, help="runtime instances (default: the config's instance_count)")
    add_payload_args(inproc)
    add_measurement_args(inproc)
    peers = sub.add_parser("peers", help="taskserve vs KServe vs MLServer vs echo, same model, same client")
    from taskserve.benchmarks.peer_compare import add_peer_args

    add_peer_args(peers)
    add_payload_args(peers)
    add_measurement_args(peers)
    from taskserve.benchmarks.batching_bench import build_parser as add_batching

    add_batching(sub)
    from taskserve.benchmarks.floor_bench import build_parser as add_floor

    add_floor(sub)
    from taskserve.benchmarks.layout_bench import build_parser as add_layouts

    add_layouts(sub)
    from taskserve.benchmarks.generation_bench import build_parser as add_generation

    add_generation(sub)
    from taskserve.benchmarks.door_bench import build_parser as add_doors

    add_doors(sub)
    from taskserve.benchmarks.embedding_door_bench import build_parser as add_embedding_doors

    add_embedding_doors(sub)
    from taskserve.benchmarks.image_generation_bench import build_parser as add_image_generation

    add_image_generation(sub)
    from taskserve.benchmarks.quantization_bench import build_parser as add_quantization

    add_quantization(sub)
    sub.add_parser("echo-server", help="bare grpc.aio v2 echo server (latency floor)", add_help=False)
    sub.add_parser("export", help="export benchmarks (taskserve.benchmarks.export_bench)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # These two own their arguments entirely.
    if argv[:1] == ["echo-server"]:
        from taskserve.benchmarks.echo_server import main as echo_main

        return echo_main(argv[1:])
    if argv[:1] == ["export"]:
        try:
            from taskserve.benchmarks.export_bench import main as export_main  # type: ignore[import-not-found,unused-ignore]
        except ImportError as err:
            print(f"taskserve-bench export is not available: {err}", file=sys.stderr)
            return 2
        result: int = export_main(argv[1:])
        return result
    args = build_parser().parse_args(argv)
    from taskserve.benchmarks.machine import DirtyTree, require_clean_tree

    try:
        require_clean_tree(args.allow_dirty)
    except DirtyTree as err:
        print(f"taskserve-bench {args.command}: {err}", file=sys.stderr)
        return 2
    try:
        if args.command in ("closed", "open"):
            from taskserve.benchmarks.server_load import run_server_load

            runs, paths = asyncio.run(run_server_load(args))
        elif args.command == "batching":
            from taskserve.benchmarks.batching_bench import run_batching

            runs, paths = run_batching(args)
        elif args.command == "layouts":
            from taskserve.benchmarks.layout_bench import run_layouts

            runs, paths = run_layouts(args)
        elif args.command == "generation" and args.peer:
            from taskserve.benchmarks.generation_peers import run_generation_peers

            runs, paths = run_generation_peers(args)
        elif args.command == "generation":
            from taskserve.benchmarks.generation_bench import run_generation

            runs, paths = run_generation(args)
        elif args.command == "doors":
            from taskserve.benchmarks.door_bench import run_doors

            runs, paths = run_doors(args)
        elif args.command == "embedding-doors":
            from taskserve.benchmarks.embedding_door_bench import run_embedding_doors

            runs, paths = run_embedding_doors(args)
        elif args.command == "floor":
            from taskserve.benchmarks.floor_bench import run_floor

            runs, paths = run_floor(args)
        elif args.command == "image-generation":
            from taskserve.benchmarks.image_generation_bench import run_image_generation

            runs, paths = run_image_generation(args)
        elif args.command == "quantization":
            from taskserve.benchmarks.quantization_bench import run_quantization

            runs, paths = run_quantization(args)
        elif args.command == "in-process":
            from taskserve.benchmarks.inprocess_cli import run_in_process_cli

            runs, paths = run_in_process_cli(args)
        else:
            from taskserve.benchmarks.peer_compare import run_peers
            from taskserve.benchmarks.peer_summary import summarize

            runs, paths = run_peers(args, summarize)
    except (TaskServeError, FileNotFoundError, ValueError) as err:
        # Setup problems (server unreachable, model missing, bad payload): a message, not a traceback.
        print(f"taskserve-bench {args.command}: {err}", file=sys.stderr)
        return 1
    print_summary(runs, paths)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
