"""``make bench``: regenerate every published result in benchmarks/results, in one command.

Runs each taskserve-bench command that writes a published file, in order, from a
clean commit (each refuses a dirty tree; the results a step writes do not count
as dirty for the next). Prints the plan and its expected duration first. The GPU
results (gpu-*.json) need an NVIDIA machine: benchmarks/gpu/device_check.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from taskserve.benchmarks.machine import DirtyTree, require_clean_tree

MODEL = "all-MiniLM-L6-v2"
GENERATION_MODEL = "SmolLM2-135M-Instruct"
RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
# SmolLM2's weights as a transformers folder: the generation step compares with `generate` on them.
SMOLLM2_SOURCE = Path("build/bench/smollm2-source")
# Results once published, now measured inside another one: make bench removes them if present.
# (KServe with one thread per session is the kserve-tuned row of peers-all-MiniLM-L6-v2.)
SUPERSEDED = (f"peers-{MODEL}-kserve-1-thread",)
# Measured on a GPU machine (benchmarks/gpu/device_check.sh), not by make bench.
GPU_PREFIX = "gpu-"
# vLLM joins the generation peers when its opt-in environment exists (PEERS_VLLM=1 make peers).
VLLM_PYTHON = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"


@dataclass(frozen=True)
class Step:
    name: str  # results file name (without extension)
    minutes: int  # expected on the 2-core machine these were first measured on
    argv: tuple[str, ...]
    # Run before the step (e.g. materialize weights); None: nothing to prepare.
    prepare: Callable[[], None] | None = None


def _smollm2_source() -> None:
    if not (SMOLLM2_SOURCE / "config.json").is_file():
        from taskserve.exporters import smollm2

        smollm2.materialize(SMOLLM2_SOURCE)


def _generation_peers() -> str:
    return "llama.cpp,vllm" if VLLM_PYTHON.is_file() else "llama.cpp"


def steps(repo: Path) -> list[Step]:
    peers = ("peers", "--model-repository", str(repo), "--model", MODEL, "--concurrency", "1,8,32",
             "--repeats", "2", "--server-starts", "2", "--window", "4", "--max-windows", "4", "--quiet")  # fmt: skip
    return [
        Step(f"peers-{MODEL}", 20, (*peers, "--name", f"peers-{MODEL}")),
        # Same-length requests: MLServer's adaptive batching can merge them (mlserver-tuned).
        Step(f"peers-{MODEL}-fixed-length", 20, (*peers, "--fixed-length", "--name", f"peers-{MODEL}-fixed-length")),
        Step(f"batching-{MODEL}", 8, ("batching", "--model-repository", str(repo), "--model", MODEL,
                                      "--repeats", "2", "--name", f"batching-{MODEL}", "--quiet")),  # fmt: skip
        Step(f"layouts-{MODEL}", 5, ("layouts", "--model-repository", str(repo), "--model", MODEL,
                                     "--repeats", "3", "--name", f"layouts-{MODEL}", "--quiet")),  # fmt: skip
        Step("floor-tiny", 7, ("floor", "--repeats", "2", "--server-starts", "4", "--window", "3",
                               "--name", "floor-tiny", "--quiet")),  # fmt: skip
        Step("export_bench", 6, ("export",)),
        Step(f"generation-{GENERATION_MODEL}", 8, ("generation", "--model-repository", str(repo), "--model",
                                                   GENERATION_MODEL, "--source", str(SMOLLM2_SOURCE), "--quiet",
                                                   "--name", f"generation-{GENERATION_MODEL}"),
             prepare=_smollm2_source),  # fmt: skip
        # The OpenAI HTTP door against typed gRPC on the same server (issue 20's ratio).
        Step(f"doors-{GENERATION_MODEL}", 7, ("doors", "--model-repository", str(repo), "--model", GENERATION_MODEL,
                                              "--streams", "1,8,32", "--repeats", "4", "--quiet",
                                              "--name", f"doors-{GENERATION_MODEL}")),  # fmt: skip
        # llama.cpp's server (and vLLM's, when installed) against taskserve's door: make peers builds them.
        Step(f"generation-peers-{GENERATION_MODEL}", 35, ("generation", "--peer", _generation_peers(),
                                                          "--model-repository", str(repo), "--model", GENERATION_MODEL,
                                                          "--source", str(SMOLLM2_SOURCE), "--streams", "1,8,32",
                                                          "--requests-per-stream", "8", "--repeats", "2", "--quiet",
                                                          "--name", f"generation-peers-{GENERATION_MODEL}"),
             prepare=_smollm2_source),  # fmt: skip
        # One stream again with four repeats: int4 / llama.cpp Q4_1 (issue 21's goal) sits within the
        # machine's drift between minutes, which two repeats cannot tell from a verdict.
        Step(f"generation-peers-{GENERATION_MODEL}-one-stream", 4, (
            "generation", "--peer", "llama.cpp", "--model-repository", str(repo), "--model", GENERATION_MODEL,
            "--source", str(SMOLLM2_SOURCE), "--streams", "1", "--requests-per-stream", "8", "--repeats", "4",
            "--servers", "taskserve-int4,taskserve-int8,llama.cpp-q4_1", "--quiet",
            "--name", f"generation-peers-{GENERATION_MODEL}-one-stream"),
             prepare=_smollm2_source),  # fmt: skip
        # The prefix cache: 32 requests sharing a 500-token system prompt, TTFT with the cache off / on.
        Step(f"generation-prefix-cache-{GENERATION_MODEL}", 3, (
            "generation", "--model-repository", str(repo), "--model", GENERATION_MODEL, "--shared-prefix-tokens", "500",
            "--shared-prefix-streams", "32", "--new-tokens", "16", "--quiet",
            "--name", f"generation-prefix-cache-{GENERATION_MODEL}")),  # fmt: skip
        # The same sentence-embedding model through v2 gRPC, v2 REST, typed gRPC and /v1/embeddings.
        Step(f"embedding-doors-{MODEL}", 6, ("embedding-doors", "--model-repository", str(repo), "--model", MODEL,
                                             "--concurrency", "1,8,32", "--repeats", "2", "--window", "3",
                                             "--max-windows", "4", "--quiet",
                                             "--name", f"embedding-doors-{MODEL}")),  # fmt: skip
        # --weights int8/int4 against float32 through the engine's runner (quality only: load-independent).
        Step(f"quantization-{GENERATION_MODEL}", 10, ("quantization", "--source", str(SMOLLM2_SOURCE),
                                                      "--model", GENERATION_MODEL,
                                                      "--name", f"quantization-{GENERATION_MODEL}"),
             prepare=_smollm2_source),  # fmt: skip
        Step("image-generation-tiny-sd", 6, ("image-generation", "--size", "64", "--steps", "50", "--requests", "8",
                                             "--repeats", "3", "--concurrency", "4",
                                             "--name", "image-generation-tiny-sd")),  # fmt: skip
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", type=Path, default=Path("demo-models"))
    parser.add_argument("--only", help="comma-separated results names to regenerate (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = parser.parse_args(argv)
    plan = steps(args.model_repository)
    if args.only:
        wanted = set(args.only.split(","))
        plan = [s for s in plan if s.name in wanted]
    total = sum(s.minutes for s in plan)
    print(f"make bench: {len(plan)} results, expected about {total} minutes on 2 quiet cores:")
    for s in plan:
        print(f"  ~{s.minutes:>2} min  {s.name}: taskserve-bench {' '.join(s.argv)}")
    if args.dry_run:
        return 0
    try:
        require_clean_tree(allow_dirty=False)
    except DirtyTree as err:
        print(f"make bench: {err}", file=sys.stderr)
        return 2
    started = time.monotonic()
    for s in plan:
        print(f"--- {s.name} ({(time.monotonic() - started) / 60:.0f} min in)", flush=True)
        if s.prepare is not None:
            s.prepare()
        rc = subprocess.call([sys.executable, "-m", "taskserve.benchmarks.cli", *s.argv])
        if rc != 0:
            print(f"make bench: {s.name} failed (exit {rc})", file=sys.stderr)
            return rc
    if not args.only:
        for name in SUPERSEDED:
            for old in RESULTS.glob(f"{name}.*"):
                old.unlink()
    print(f"make bench: done in {(time.monotonic() - started) / 60:.0f} min; commit benchmarks/results")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
