"""``taskserve-bench floor``: taskserve's per-request overhead against the Python gRPC floor.

A tiny model (four floats in, four out: ``y = 2x + 1``) served by taskserve, and a
bare grpc.aio v2 echo service returning the same bytes, both loaded at concurrency 1
by the same client, alternating. The p50 ratio (median over repeats) is the cost of
everything taskserve adds: validation, the batcher, the runtime thread, metrics.
Both servers are started afresh ``--server-starts`` times (one process's p50 can
sit ~8 % off another identical one's for its whole life on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper
from taskserve.benchmarks.stats import LatencySummary, RunResult

MODEL = "tiny-affine"
GOAL = 1.2


def write_tiny_model(repo: Path, width: int = 4) -> Path:
    """``repo/tiny-affine``: FP32 [batch, width] -> [batch, width], y = 2x + 1, batching on."""
    two = numpy_helper.from_array(np.full((width,), 2.0, np.float32), "two")
    one = numpy_helper.from_array(np.full((width,), 1.0, np.float32), "one")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["scaled"]), helper.make_node("Add", ["scaled", "one"], ["y"])],
        "tiny_affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])],
        initializer=[two, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = repo / MODEL
    (entry / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(entry / "1" / "model.onnx"))
    config = {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 500}, "runtime": {"intra_op_threads": 1}}
    (entry / "config.yaml").write_text(yaml.safe_dump(config))
    return entry


def p50_ratio(runs: list[RunResult]) -> dict[str, float]:
    def p50s(server: str) -> list[float]:
        return [LatencySummary.of(r.latencies_s).p50 for r in runs if r.server == server]

    taskserve, echo = statistics.median(p50s("taskserve")), statistics.median(p50s("echo"))
    return {
        "taskserve_p50_ms": round(taskserve, 4),
        "echo_p50_ms": round(echo, 4),
        "p50_ratio": round(taskserve / echo, 3),
    }


def run_floor(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    from taskserve.benchmarks.cli import build_parser
    from taskserve.benchmarks.peer_compare import run_peers

    with tempfile.TemporaryDirectory(prefix="taskserve-floor-") as tmp:
        repo = Path(tmp)
        write_tiny_model(repo)
        peer_args = build_parser().parse_args([
            "peers", "--model-repository", str(repo), "--model", MODEL, "--servers", "taskserve,echo",
            "--concurrency", "1", "--repeats", str(args.repeats), "--server-starts", str(args.server_starts),
            "--payload", "random", "--num-requests", "16",
            "--warmup", str(args.warmup), "--window", str(args.window), "--max-windows", str(args.max_windows),
            "--stable-windows", str(args.stable_windows), "--out", str(args.out), "--name", args.name or "floor-tiny",
            *(["--quiet"] if args.quiet else []),
        ])  # fmt: skip
        runs, paths = run_peers(peer_args, summarize)
    return runs, paths


def summarize(runs: list[RunResult]) -> tuple[dict[str, object], list[str]]:
    """The p50 ratio and its verdict, for the results files."""
    ratio = p50_ratio(runs)
    met = "met" if ratio["p50_ratio"] <= GOAL else "NOT met"
    verdict = f"p50 taskserve / echo at concurrency 1: {ratio['p50_ratio']:.3f} (<= {GOAL}: {met})"
    print(verdict)
    return {"ratios": ratio}, [verdict]


def build_parser(sub: Any) -> None:
    from taskserve.benchmarks.cli_args import add_measurement_args

    p = sub.add_parser("floor", help="tiny model: taskserve p50 vs a bare grpc.aio echo (the Python gRPC floor)")
    p.add_argument("--repeats", type=int, default=2, help="sweeps per server start (default 2)")
    p.add_argument("--server-starts", type=int, default=4, help="fresh processes of both servers (default 4)")
    add_measurement_args(p)
