"""``taskserve-bench floor``: taskserve's per-request overhead against the Python gRPC floor.

A tiny model (four floats in, four out: ``y = 2x + 1``) served by taskserve, and a
bare grpc.aio v2 echo service returning the same bytes, both loaded at concurrency 1
by the same client, alternating. The p50 ratio (median over repeats) is the cost of
everything taskserve adds: validation, the batcher, metrics.

Two paths, both reported: ``taskserve`` as configured (``inline_compute_us`` 100,
the default: a lone request this cheap computes on the event loop, the idle-server
fast path) and ``taskserve-threaded`` (``inline_compute_us: 0``: every batch goes
through the queue and an instance thread, the path any model heavier than ~0.1 ms
per row takes). Both servers are started afresh ``--server-starts`` times (one process's p50 can
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


PATHS = {
    "taskserve": "inline path (inline_compute_us 100: computed on the event loop)",
    "taskserve-threaded": "threaded path (inline_compute_us 0: queue, batcher, instance thread)",
}


def p50_ratio(runs: list[RunResult], server: str = "taskserve") -> dict[str, float]:
    def p50s(name: str) -> list[float]:
        return [LatencySummary.of(r.latencies_s).p50 for r in runs if r.server == name]

    taskserve, echo = statistics.median(p50s(server)), statistics.median(p50s("echo"))
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
            "peers", "--model-repository", str(repo), "--model", MODEL,
            "--servers", "taskserve,taskserve-threaded,echo",
            "--concurrency", "1", "--repeats", str(args.repeats), "--server-starts", str(args.server_starts),
            "--payload", "random", "--num-requests", "16",
            "--warmup", str(args.warmup), "--window", str(args.window), "--max-windows", str(args.max_windows),
            "--stable-windows", str(args.stable_windows), "--out", str(args.out), "--name", args.name or "floor-tiny",
            *(["--quiet"] if args.quiet else []),
        ])  # fmt: skip
        runs, paths = run_peers(peer_args, summarize)
    return runs, paths


def summarize(runs: list[RunResult]) -> tuple[dict[str, object], list[str]]:
    """The p50 ratio of each path and its verdict (only from stable, error-free runs)."""
    ratios: dict[str, object] = {}
    lines = []
    for server, path in PATHS.items():
        ours = [r for r in runs if r.server in (server, "echo")]
        if not any(r.server == server for r in ours):
            continue
        unusable = sorted({why for r in ours if (why := r.unusable)})
        ratio = p50_ratio(ours, server)
        ratios[server] = {**ratio, "path": path}
        if unusable:
            verdict = f"no verdict ({'; '.join(unusable)})"
        else:
            verdict = f"<= {GOAL}: {'met' if ratio['p50_ratio'] <= GOAL else 'NOT met'}"
        lines.append(f"p50 {server} / echo at concurrency 1, {path}: {ratio['p50_ratio']:.3f} ({verdict})")
    for line in lines:
        print(line)
    return {"ratios": ratios}, lines


def build_parser(sub: Any) -> None:
    from taskserve.benchmarks.cli_args import add_measurement_args

    p = sub.add_parser("floor", help="tiny model: taskserve p50 vs a bare grpc.aio echo (the Python gRPC floor)")
    p.add_argument("--repeats", type=int, default=2, help="sweeps per server start (default 2)")
    p.add_argument("--server-starts", type=int, default=4, help="fresh processes of both servers (default 4)")
    add_measurement_args(p)
