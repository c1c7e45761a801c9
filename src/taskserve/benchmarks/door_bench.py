"""``taskserve-bench doors``: the OpenAI-compatible HTTP door against the typed gRPC door on
the same generation model, in one server, with the same client logic.

One taskserve process serves the text-generation entry (sized for the largest stream count,
as ``generation`` sizes it) on both ports. For each stream count (``--streams``, 1/8/32) the
two doors run alternately (``--repeats`` rounds), each stream a greedy completion of the same
prompt through a thread of one shared client: ``TaskServeClient.text.generate`` for gRPC, the
official ``openai`` SDK's streaming ``completions.create`` for HTTP. Aggregate tokens/s per
door and the HTTP/gRPC ratio per stream count go to the results (the issue's goal: >= 0.9).

Greedy decoding makes both doors generate the same tokens, so the work is identical; the
difference is the door. Noisy on a shared machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from taskserve.benchmarks.cli_args import add_allow_dirty, int_list
from taskserve.benchmarks.generation_bench import StreamTiming, prompt_of, stream_once, write_engine_repository
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.peer_servers import PeerProcess, free_port, spawn_taskserve
from taskserve.benchmarks.report import DEFAULT_OUT, write_results
from taskserve.benchmarks.stats import RunResult, Window
from taskserve.clients import ClientOptions, TaskServeClient

# HTTP aggregate tokens/s over gRPC's, per stream count (issue 20).
GOAL = 0.9
# One stream of a door: (prompt, new tokens) -> its timing.
Streamer = Callable[[str, int], StreamTiming]


def build_parser(sub: Any) -> None:
    p = sub.add_parser("doors", help="the OpenAI HTTP door vs typed gRPC on a generation model, same client logic")
    p.add_argument("--model-repository", type=Path, required=True, help="repository holding the model")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--streams", type=int_list, default=[1, 8, 32], help="concurrent streams, e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens each stream generates (default 128)")
    p.add_argument("--prompt-tokens", type=int, default=24, help="prompt tokens of each stream (default 24)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds per stream count (default 2)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-stream deadline, seconds")
    p.add_argument("--name", help="results file name (default doors-<model>)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default benchmarks/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_allow_dirty(p)


def grpc_streamer(client: TaskServeClient, model: str) -> Streamer:
    return lambda prompt, new_tokens: stream_once(client, model, prompt, new_tokens)


def openai_streamer(client: Any, model: str) -> Streamer:
    """A streaming greedy completion through the OpenAI SDK; tokens from the usage chunk."""

    def stream(prompt: str, new_tokens: int) -> StreamTiming:
        started = time.perf_counter()
        first = 0.0
        tokens = prompt_tokens = 0
        events = client.completions.create(
            model=model, prompt=prompt, max_tokens=new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        for chunk in events:
            if not first and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - started
            if chunk.usage is not None:
                tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        return StreamTiming(tokens, prompt_tokens, first, time.perf_counter() - started)

    return stream


def run_streams(streamer: Streamer, prompts: Sequence[str], new_tokens: int) -> tuple[float, list[StreamTiming]]:
    """All prompts at once, one thread each; the wall time and each stream's timing."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        timings = list(pool.map(lambda p: streamer(p, new_tokens), prompts))
    return time.perf_counter() - started, timings


def _run_result(door: str, streams: int, repeat: int, wall: float, timings: Sequence[StreamTiming]) -> RunResult:
    window = Window(wall, tuple(t.total_s for t in timings), {}, items_per_request=1)
    tokens = sum(t.tokens for t in timings)
    extra: dict[str, float | int | str] = {"tokens": tokens, "tokens_per_s": tokens / wall}
    return RunResult(f"{door}-streams-{streams}", "closed", streams, 1, (window,), (window,), True, repeat, extra)


def compare_doors(
    doors: dict[str, Streamer], prompts_of: Callable[[int], list[str]], streams: Sequence[int], new_tokens: int,
    repeats: int, say: Callable[[str], None] = lambda _: None,
) -> tuple[list[RunResult], dict[str, float]]:  # fmt: skip
    """Alternate the doors ``repeats`` times per stream count; ratios of the summed tokens/s.

    Equal work: before a stream count is measured, each door runs it once unmeasured (the
    first door at a new count otherwise pays for the engine's and the connections' warm-up
    alone), and the door that goes first changes with every repeat."""
    runs: list[RunResult] = []
    ratios: dict[str, float] = {}
    for n in streams:
        prompts = prompts_of(n)
        tokens = dict.fromkeys(doors, 0)
        seconds = dict.fromkeys(doors, 0.0)
        for streamer in doors.values():
            run_streams(streamer, prompts, new_tokens)
        order = list(doors.items())
        for repeat in range(repeats):
            for door, streamer in order if repeat % 2 == 0 else order[::-1]:
                wall, timings = run_streams(streamer, prompts, new_tokens)
                run = _run_result(door, n, repeat, wall, timings)
                runs.append(run)
                tokens[door] += int(run.extra["tokens"])
                seconds[door] += wall
                say(f"{door:5s} {n:3d} streams: {tokens[door] / seconds[door]:8.1f} tokens/s aggregate")
        if "http" in doors and "grpc" in doors and tokens["grpc"]:
            ratios[f"http_vs_grpc_streams_{n}"] = (tokens["http"] / seconds["http"]) / (
                tokens["grpc"] / seconds["grpc"]
            )
    return runs, ratios


def run_doors(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    import openai

    model_dir: Path = args.model_repository / args.model
    if not (model_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model entry (no config.yaml); build it with taskserve-export")
    say: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
    streams = sorted(set(args.streams))
    work = Path(tempfile.mkdtemp(prefix="taskserve-doors-"))
    tokenizer = model_dir / "tokenizer.json"
    try:
        repo = write_engine_repository(
            model_dir, args.model, work, max(streams), args.prompt_tokens + args.new_tokens + 64
        )
        http_port = free_port()
        peer: PeerProcess = spawn_taskserve(repo, work, extra_args=("--http-port", str(http_port)))
        try:
            peer.wait_ready(args.model, args.startup_timeout)
            options = ClientOptions(timeout_s=args.timeout, retry=None)
            with (
                TaskServeClient(peer.address, options) as typed,
                openai.OpenAI(
                    base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=args.timeout
                ) as sdk,
            ):
                doors = {"grpc": grpc_streamer(typed, args.model), "http": openai_streamer(sdk, args.model)}
                for streamer in doors.values():
                    streamer(prompt_of(tokenizer, 16), 4)  # warm-up, both doors

                def prompts_of(n: int) -> list[str]:
                    return [prompt_of(tokenizer, args.prompt_tokens, salt=i) for i in range(n)]

                runs, ratios = compare_doors(doors, prompts_of, streams, args.new_tokens, args.repeats, say)
        finally:
            peer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [f"{k}: {v:.2f} (>= {GOAL:g}: {'met' if v >= GOAL else 'MISSED'})" for k, v in ratios.items()]
    config = {
        "mode": "doors", "model": args.model, "streams": streams, "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "decoding": "greedy",
        "clients": {"grpc": "taskserve TaskServeClient.text.generate", "http": "openai SDK completions (stream)"},
    }  # fmt: skip
    paths = write_results(
        args.name or f"doors-{args.model}", runs, config=config, machine=machine_info(), out_dir=args.out,
        extra={"ratios": ratios, "goal": GOAL}, notes=notes,
    )  # fmt: skip
    return runs, paths
