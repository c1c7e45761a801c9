"""Command-line arguments shared by the taskserve-bench subcommands, and what they turn into."""

from __future__ import annotations

import argparse
from pathlib import Path

from taskserve.benchmarks.loadgen import WindowPlan
from taskserve.benchmarks.payloads import Payload, build_payload
from taskserve.benchmarks.report import DEFAULT_OUT
from taskserve.clients.metadata import TensorMetadata


def float_list(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def int_list(text: str) -> list[int]:
    values = float_list(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}")
    return [int(v) for v in values]


def add_measurement_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default 2)")
    g.add_argument("--window", type=float, default=5.0, help="seconds per measurement window (default 5)")
    g.add_argument("--max-windows", type=int, default=6, help="give up on stability after this many (default 6)")
    g.add_argument("--stable-windows", type=int, default=2, help="consecutive windows that must agree (default 2)")
    g.add_argument("--tolerance", type=float, default=0.05, help="relative throughput spread that counts as agreeing")
    g.add_argument("--name", help="results file name (default: <mode>-<model>)")
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default benchmarks/results)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    add_allow_dirty(g)


def add_allow_dirty(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Every mode that writes results refuses a dirty tree unless told (benchmarks/machine.py)."""
    p.add_argument(
        "--allow-dirty", action="store_true",
        help="measure on a working tree that differs from its commit (the results are marked dirty)",
    )  # fmt: skip


def add_payload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("payload")
    g.add_argument("--payload", default="auto", help="auto, text, image, random or a .npz of inputs (default auto)")
    g.add_argument("--batch-size", type=int, default=1, help="items per request (default 1)")
    g.add_argument("--num-requests", type=int, default=64, help="distinct requests in the pool (default 64)")
    g.add_argument("--min-tokens", type=int, default=8, help="shortest sentence, tokens (default 8)")
    g.add_argument("--max-tokens", type=int, default=32, help="longest sentence, tokens (default 32)")
    g.add_argument("--fixed-length", action="store_true", help="pad every text request to --max-tokens")
    g.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the model's, else all-MiniLM-L6-v2's)")
    g.add_argument("--variable-dim", type=int, default=16, help="size of variable dims in random payloads")
    g.add_argument("--seed", type=int, default=0)


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target")
    g.add_argument("--target", default="127.0.0.1:8001", help="server address host:port (default 127.0.0.1:8001)")
    g.add_argument("--model", required=True, help="model name")
    g.add_argument("--model-version", default="", help="model version (default: the served one)")
    g.add_argument("--protocol", choices=("v2", "typed"), default="v2", help="KServe v2 or a taskserve.v1 service")
    g.add_argument(
        "--task", help="typed service: embed, classify-text, tag, fill-mask, classify-image, detect, segment"
    )
    g.add_argument("--model-repository", type=Path, help="repository holding the model (to find its tokenizer.json)")
    g.add_argument("--label", default="taskserve", help="server name in the results (default taskserve)")
    g.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, seconds (default 30)")
    g.add_argument("--startup-timeout", type=float, default=60.0, help="seconds to wait for the model to be ready")


def plan_from(args: argparse.Namespace) -> WindowPlan:
    return WindowPlan(args.warmup, args.window, args.max_windows, args.stable_windows, args.tolerance)


def payload_from_args(args: argparse.Namespace, specs: list[TensorMetadata], model_dir: Path | None) -> Payload:
    return build_payload(
        args.payload, specs, count=args.num_requests, batch_size=args.batch_size, min_tokens=args.min_tokens,
        max_tokens=args.max_tokens, tokenizer_path=args.tokenizer, model_dir=model_dir,
        variable_dim=args.variable_dim, seed=args.seed, fixed_length=args.fixed_length,
    )  # fmt: skip
