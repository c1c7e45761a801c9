"""``taskserve-bench quantization``: the exporter's ``--weights`` quality check on a real decoder,
one export per mode, collected into ``benchmarks/results/<name>.{json,md}``
(``exporters/quality_report.py``). Quality only: counts and perplexities, no timings, so the
result does not depend on the machine's load."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from taskserve.benchmarks.machine import tree_state

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("quantization", help="--weights int8/int4 quality against float32 on a real decoder")
    p.add_argument("--source", type=Path, required=True, help="transformers folder of the decoder (e.g. SmolLM2)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct", help="entry name prefix and report title")
    p.add_argument("--modes", default="int8,int4", help="comma-separated --weights modes")
    p.add_argument("--work", type=Path, default=Path("build/bench/quantization"), help="where the entries go")
    p.add_argument("--name", required=True, help="results file name (without extension)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--allow-dirty", action="store_true", help="measure uncommitted changes")


def run_quantization(args: argparse.Namespace) -> tuple[list[Any], dict[str, Path]]:
    from taskserve.exporters.api import export_hf
    from taskserve.exporters.quality_report import main as report

    commit, dirty = tree_state()
    entries: list[str] = []
    commands = [
        f"# at commit {(commit or 'unknown')[:12]}{' (dirty)' if dirty else ''}; make bench runs:",
        shlex.join(["taskserve-bench", "quantization", "--source", str(args.source), "--model", args.model,
                    "--modes", args.modes, "--work", str(args.work), "--name", args.name]),
        "# which exports each mode as:",
    ]  # fmt: skip
    for mode in args.modes.split(","):
        name = f"{args.model}-{mode}"
        # A mode that misses the tolerance is still measured: the report says what it missed.
        export_hf(args.source, "text-generation", args.work, name, weights=mode, allow_quality_loss=True,
                  progress=not args.quiet)  # fmt: skip
        commands.append(
            f"taskserve-export hf {args.source} --task text-generation --weights {mode} --allow-quality-loss "
            f"--out {args.work} --name {name}"
        )
        entries.append(str(args.work / name))
    out = RESULTS / args.name
    title = f"Weight-only quantization quality: {args.model}"
    argv = [str(out), *entries, "--title", title]
    for command in commands:
        argv += ["--command", command]
    report(argv)
    return [], {"json": out.with_suffix(".json"), "markdown": out.with_suffix(".md")}
