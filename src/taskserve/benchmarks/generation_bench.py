"""``taskserve-bench generation``: the generation engine's targets, measured in one run.

One taskserve process serves the text-generation entry (its ``generation`` block raised
so the largest stream count fits: ``max_num_seqs``, ``max_concurrent_generations``).
Through the typed TextGeneration service, greedy, it measures

- aggregate tokens/s of 1, 8 and 32 concurrent streams (``--streams``);
- decode tokens/s of one stream after a ~100-token and a ~1,000-token prompt (first
  token excluded: that is prefill);
- one stream's tokens/s (prefill included) against transformers' ``generate`` in this
  process on the same weights (``--source``, a transformers folder; skipped without it);
- time to first token (p50) of a ~200-token prompt on an idle server and with 8 streams
  decoding.

With ``--shared-prefix-tokens N`` it measures the prefix cache instead (issue 21): one
server with ``generation.prefix_caching`` on, then one with it off, each sent
``--shared-prefix-streams`` requests at once that all start with the same N-token system
prompt and end with a question of their own (``--shared-prefix-primed``: after one request
that carried the system prompt alone); the ratio is TTFT p50 off / on (target >= 3). ``--prefix-cache off`` runs the
regular windows with the cache off.

Ratios are within one run. Noisy on a shared machine: run it on a quiet one.
"""

# transformers' factories are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from taskserve.benchmarks.cli_args import add_allow_dirty, int_list
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.peer_servers import PeerProcess, link_tree, spawn_taskserve
from taskserve.benchmarks.report import DEFAULT_OUT, write_results
from taskserve.benchmarks.stats import RunResult, Window
from taskserve.clients import ClientOptions, TaskServeClient
from taskserve.server.repository.config import GenerationConfig

# (goal, True when higher is better), from issue 12.
TARGETS = {
    "streams_8_vs_1_tokens_per_s": (5.0, True),
    "streams_32_vs_1_tokens_per_s": (8.0, True),
    "context_1000_vs_100_tokens_per_s": (0.8, True),
    "server_vs_transformers_tokens_per_s": (1.3, True),
    "ttft_p50_busy_vs_idle": (2.0, False),
    "shared_prefix_ttft_p50_off_vs_on": (3.0, True),
}
# Text the prompts are cut from (tokens, then decoded back).
_FILLER = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and wool. Over the centuries the market grew into a town, the town built walls, and the "
    "walls were torn down again when the railway arrived and the factories needed room. "
)


@dataclass(frozen=True)
class StreamTiming:
    tokens: int
    prompt_tokens: int
    # Seconds from the call to the first chunk, and to the last.
    first_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, over the time after the first (prefill excluded)."""
        span = self.total_s - self.first_s
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else 0.0


def add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-repository", type=Path, required=True, help="repository holding the model")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--source", type=Path, help="transformers folder of the same weights (for the generate comparison)")
    p.add_argument("--streams", type=int_list, default=[1, 8, 32], help="concurrent streams, e.g. 1,8,32")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens each stream generates (default 128)")
    p.add_argument("--short-context", type=int, default=100, help="prompt tokens of the short-context run")
    p.add_argument("--long-context", type=int, default=1000, help="prompt tokens of the long-context run")
    p.add_argument("--ttft-prompt", type=int, default=200, help="prompt tokens of the TTFT probes")
    p.add_argument("--ttft-samples", type=int, default=5, help="TTFT probes per condition (default 5)")
    p.add_argument("--busy-streams", type=int, default=8, help="streams decoding during the busy TTFT probes")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-stream deadline, seconds")
    p.add_argument(
        "--name", help="results file name (default generation-<model>; with --peer generation-peers-<model>)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results directory (default benchmarks/results)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--prefix-cache", choices=("on", "off"), default="on",
                   help="generation.prefix_caching of the served entry (default on)")  # fmt: skip
    p.add_argument("--shared-prefix-tokens", type=int, default=0,
                   help="measure the prefix cache instead: requests sharing a system prompt of this many "
                        "tokens, TTFT with the cache on vs off (e.g. 500)")  # fmt: skip
    p.add_argument("--shared-prefix-streams", type=int, default=32,
                   help="requests sent at once in the shared-prefix run (default 32)")  # fmt: skip
    p.add_argument("--shared-prefix-primed", action="store_true",
                   help="one request with the shared prefix before the concurrent ones (default: cold)")  # fmt: skip


def build_parser(sub: Any) -> None:
    from taskserve.benchmarks.generation_peers import add_peer_args

    p = sub.add_parser(
        "generation",
        help="generation engine targets: streams, context length, TTFT, vs transformers; "
        "with --peer: against llama.cpp / vLLM's OpenAI servers",
    )
    add_generation_args(p)
    add_peer_args(p)
    add_allow_dirty(p)


def room_for_streams(generation: dict[str, Any], streams: int) -> None:
    """Raise an entry's ``generation`` block (in place) to ``streams`` sequences at once and a
    per-step budget that holds a token of each; what it leaves unset counts as the server's default."""
    defaults = GenerationConfig()
    generation["max_num_seqs"] = max(int(generation.get("max_num_seqs", defaults.max_num_seqs)), streams)
    budget = int(generation.get("max_num_batched_tokens", defaults.max_num_batched_tokens))
    generation["max_num_batched_tokens"] = max(budget, streams)


def write_engine_repository(
    model_dir: Path, model: str, root: Path, streams: int, positions: int, prefix_caching: bool | None = None
) -> Path:
    """A repository with the entry's files linked and its config sized for ``streams`` streams
    (``prefix_caching``: set ``generation.prefix_caching``; None leaves the entry's own)."""
    repo = root / "repository"
    entry = repo / model
    entry.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.yaml":
            link_tree(item, entry / item.name)
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    generation = config.get("generation")
    if not isinstance(generation, dict):
        raise ValueError(f"{model_dir} is not a generation-engine entry (no generation block); re-export it")
    room_for_streams(generation, streams)
    generation["max_model_len"] = max(int(generation.get("max_model_len", 2048)), positions)
    if prefix_caching is not None:
        generation["prefix_caching"] = prefix_caching
    options = config.setdefault("task_options", {})
    options["max_concurrent_generations"] = max(int(options.get("max_concurrent_generations", 64)), streams + 16)
    (entry / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return repo


def prompt_of(tokenizer_path: Path, tokens: int, salt: int = 0) -> str:
    """Text of about ``tokens`` tokens (cut from the filler, starting ``salt`` words in)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    words = _FILLER.split()
    text = " ".join(words[salt % len(words) :] + words * (tokens // 8 + 2))
    ids = tokenizer.encode(text, add_special_tokens=False).ids[:tokens]
    decoded: str = tokenizer.decode(ids)
    return decoded


def stream_once(client: TaskServeClient, model: str, prompt: str, new_tokens: int) -> StreamTiming:
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    prompt_tokens = 0
    for chunk in client.text.generate(model=model, prompt=prompt, max_new_tokens=new_tokens):
        if not first:
            first = time.perf_counter() - started
        tokens += len(chunk.token_ids)
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    return StreamTiming(tokens, prompt_tokens, first, time.perf_counter() - started)


def concurrent_streams(
    client: TaskServeClient, model: str, prompts: Sequence[str], new_tokens: int
) -> tuple[float, list[StreamTiming]]:
    """All prompts at once; the wall time and each stream's timing."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        timings = list(pool.map(lambda p: stream_once(client, model, p, new_tokens), prompts))
    return time.perf_counter() - started, timings


def transformers_tokens_per_s(source: Path, prompt: str, new_tokens: int) -> tuple[float, int]:
    """Greedy ``generate`` in this process: generated tokens / seconds (prefill included)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model: Any = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        model.generate(**ids, max_new_tokens=4, do_sample=False)  # warm-up
        started = time.perf_counter()
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
        elapsed = time.perf_counter() - started
    generated = int(out.shape[1] - ids["input_ids"].shape[1])
    return generated / elapsed, generated


def _run_result(label: str, load: float, timings: Sequence[StreamTiming], wall_s: float, **extra: float) -> RunResult:
    window = Window(wall_s, tuple(t.total_s for t in timings), {}, items_per_request=1)
    return RunResult(label, "closed", load, 1, (window,), (window,), True, extra=dict(extra))


def ratios_and_verdicts(measured: dict[str, float]) -> dict[str, str]:
    out = {}
    for name, value in measured.items():
        goal, higher = TARGETS[name]
        met = value >= goal if higher else value <= goal
        out[name] = f"{value:.2f} ({'>=' if higher else '<='} {goal:g}: {'met' if met else 'MISSED'})"
    return out


def run_generation(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    model_dir: Path = args.model_repository / args.model
    if not (model_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model entry (no config.yaml); build it with taskserve-export")
    if args.shared_prefix_tokens > 0:
        return run_shared_prefix(args)
    say: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
    streams = sorted(set(args.streams))
    positions = max(args.long_context, args.ttft_prompt) + args.new_tokens + 64
    work = Path(tempfile.mkdtemp(prefix="taskserve-generation-"))
    tokenizer = model_dir / "tokenizer.json"
    runs: list[RunResult] = []
    measured: dict[str, float] = {}
    try:
        repo = write_engine_repository(
            model_dir, args.model, work, max([*streams, args.busy_streams]), positions, args.prefix_cache == "on"
        )
        peer: PeerProcess = spawn_taskserve(repo, work)
        try:
            peer.wait_ready(args.model, args.startup_timeout)
            with TaskServeClient(peer.address, ClientOptions(timeout_s=args.timeout, retry=None)) as client:
                stream_once(client, args.model, prompt_of(tokenizer, 16), 4)  # warm-up
                per_stream = {}
                for n in streams:
                    prompts = [prompt_of(tokenizer, 24, salt=i) for i in range(n)]
                    wall, timings = concurrent_streams(client, args.model, prompts, args.new_tokens)
                    tps = sum(t.tokens for t in timings) / wall
                    per_stream[n] = tps
                    runs.append(_run_result(f"streams-{n}", n, timings, wall, tokens_per_s=tps))
                    say(f"{n:3d} streams: {tps:8.1f} tokens/s aggregate")
                for n, goal_name in ((8, "streams_8_vs_1_tokens_per_s"), (32, "streams_32_vs_1_tokens_per_s")):
                    if n in per_stream and 1 in per_stream:
                        measured[goal_name] = per_stream[n] / per_stream[1]
                context = {}
                for size in (args.short_context, args.long_context):
                    timing = stream_once(client, args.model, prompt_of(tokenizer, size), args.new_tokens)
                    context[size] = timing.decode_tokens_per_s
                    runs.append(
                        _run_result(f"context-{size}", size, [timing], timing.total_s,
                                    decode_tokens_per_s=timing.decode_tokens_per_s,
                                    prompt_tokens=timing.prompt_tokens)
                    )  # fmt: skip
                    say(f"context {timing.prompt_tokens:5d} tokens: {timing.decode_tokens_per_s:8.1f} tokens/s decode")
                measured["context_1000_vs_100_tokens_per_s"] = context[args.long_context] / context[args.short_context]
                # Every probe a prompt of its own: with the prefix cache on, a repeated prompt would
                # skip its prefill, and TTFT would measure one token's step instead.
                idle = [
                    stream_once(client, args.model, prompt_of(tokenizer, args.ttft_prompt, salt=1 + k), 1)
                    for k in range(args.ttft_samples)
                ]
                busy = _ttft_while_busy(client, args, tokenizer)
                idle_p50 = statistics.median(t.first_s for t in idle)
                busy_p50 = statistics.median(t.first_s for t in busy)
                runs.append(_run_result("ttft-idle", 0, idle, sum(t.total_s for t in idle), ttft_p50_s=idle_p50))
                runs.append(
                    _run_result(f"ttft-{args.busy_streams}-busy", args.busy_streams, busy,
                                sum(t.total_s for t in busy), ttft_p50_s=busy_p50)
                )  # fmt: skip
                measured["ttft_p50_busy_vs_idle"] = busy_p50 / idle_p50
                say(f"TTFT p50: idle {idle_p50 * 1e3:.0f} ms, {args.busy_streams} busy {busy_p50 * 1e3:.0f} ms")
                short_prompt = prompt_of(tokenizer, args.short_context, salt=3)  # not the context run's (cached)
                server_one = stream_once(client, args.model, short_prompt, args.new_tokens)
                server_tps = server_one.tokens / server_one.total_s
                runs.append(
                    _run_result("server-1-stream", 1, [server_one], server_one.total_s, tokens_per_s=server_tps)
                )
        finally:
            peer.stop()
        if args.source is not None:
            # After the server stopped: generate gets the cores to itself, as the server had.
            hf_tps, hf_tokens = transformers_tokens_per_s(args.source, short_prompt, args.new_tokens)
            measured["server_vs_transformers_tokens_per_s"] = server_tps / hf_tps
            say(f"one stream: server {server_tps:.1f} tokens/s, transformers {hf_tps:.1f} ({hf_tokens} tokens)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    notes = [f"{k}: {v}" for k, v in ratios_and_verdicts(measured).items()]
    # The figures behind the ratios (the table's items/s counts streams, not tokens).
    for r in runs:
        notes.append(f"{r.server}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.extra.items() if isinstance(v, float)))
    if args.source is None:
        notes.append("server vs transformers: skipped (no --source)")
    config = {
        "mode": "generation", "model": args.model, "streams": streams, "new_tokens": args.new_tokens,
        "contexts": [args.short_context, args.long_context], "ttft_prompt": args.ttft_prompt,
        "ttft_samples": args.ttft_samples, "busy_streams": args.busy_streams, "decoding": "greedy",
        "prefix_cache": args.prefix_cache,
    }  # fmt: skip
    paths = write_results(
        args.name or f"generation-{args.model}", runs, config=config, machine=machine_info(), out_dir=args.out,
        extra={"ratios": measured, "targets": {k: v[0] for k, v in TARGETS.items()}}, notes=notes,
    )  # fmt: skip
    return runs, paths


def _ttft_while_busy(client: TaskServeClient, args: argparse.Namespace, tokenizer: Path) -> list[StreamTiming]:
    """TTFT probes (each a prompt of its own) one after another while ``busy_streams`` streams
    keep decoding."""
    stop = threading.Event()
    started = threading.Barrier(args.busy_streams + 1)

    def background(i: int) -> None:
        text = prompt_of(tokenizer, 24, salt=100 + i)
        started.wait()
        while not stop.is_set():
            stream_once(client, args.model, text, args.new_tokens)

    with ThreadPoolExecutor(args.busy_streams) as pool:
        futures = [pool.submit(background, i) for i in range(args.busy_streams)]
        started.wait()
        time.sleep(0.5)  # the background streams are decoding
        try:
            return [
                stream_once(client, args.model, prompt_of(tokenizer, args.ttft_prompt, salt=50 + k), 1)
                for k in range(args.ttft_samples)
            ]
        finally:
            stop.set()
            for f in futures:
                f.result()


def shared_prefix_prompts(tokenizer_path: Path, prefix_tokens: int, count: int) -> list[str]:
    """``count`` prompts that all start with the same ``prefix_tokens``-token system prompt and
    end with a short question of their own."""
    system = prompt_of(tokenizer_path, prefix_tokens)
    return [f"{system}\nQuestion {i}: " + prompt_of(tokenizer_path, 16, salt=7 * i + 3) for i in range(count)]


def run_shared_prefix(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    """The prefix cache's target: TTFT p50 of requests sharing a system prompt, cache on vs off
    (one server each, one after the other, the same prompts)."""
    say: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
    model_dir: Path = args.model_repository / args.model
    tokenizer = model_dir / "tokenizer.json"
    count = args.shared_prefix_streams
    prompts = shared_prefix_prompts(tokenizer, args.shared_prefix_tokens, count)
    positions = args.shared_prefix_tokens + 64 + args.new_tokens
    runs: list[RunResult] = []
    p50: dict[str, float] = {}
    for mode in ("on", "off"):
        work = Path(tempfile.mkdtemp(prefix=f"taskserve-prefix-{mode}-"))
        try:
            repo = write_engine_repository(model_dir, args.model, work, count, positions, mode == "on")
            peer = spawn_taskserve(repo, work)
            try:
                peer.wait_ready(args.model, args.startup_timeout)
                with TaskServeClient(peer.address, ClientOptions(timeout_s=args.timeout, retry=None)) as client:
                    stream_once(client, args.model, prompt_of(tokenizer, 16, salt=5), 2)  # warm-up, no shared prefix
                    if args.shared_prefix_primed:  # the system prompt seen once before (cached, with the cache on)
                        stream_once(client, args.model, prompts[0], 2)
                    wall, timings = concurrent_streams(client, args.model, prompts, args.new_tokens)
            finally:
                peer.stop()
        finally:
            shutil.rmtree(work, ignore_errors=True)
        p50[mode] = statistics.median(t.first_s for t in timings)
        runs.append(_run_result(f"shared-prefix-cache-{mode}", count, timings, wall, ttft_p50_s=p50[mode],
                                prompt_tokens=float(statistics.median(t.prompt_tokens for t in timings))))  # fmt: skip
        say(f"prefix cache {mode:3s}: TTFT p50 {p50[mode] * 1e3:.0f} ms over {count} streams")
    measured = {"shared_prefix_ttft_p50_off_vs_on": p50["off"] / p50["on"]}
    notes = [f"{k}: {v}" for k, v in ratios_and_verdicts(measured).items()]
    config = {
        "mode": "generation-shared-prefix", "model": args.model, "shared_prefix_tokens": args.shared_prefix_tokens,
        "streams": count, "new_tokens": args.new_tokens, "decoding": "greedy",
        "primed": bool(args.shared_prefix_primed),
    }  # fmt: skip
    paths = write_results(
        args.name or f"generation-prefix-cache-{args.model}", runs, config=config, machine=machine_info(),
        out_dir=args.out, extra={"ratios": measured, "targets": {k: v[0] for k, v in TARGETS.items()}}, notes=notes,
    )  # fmt: skip
    return runs, paths
