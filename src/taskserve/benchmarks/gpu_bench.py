"""``python -m taskserve.benchmarks.gpu_bench``: GPU throughput/latency through the server.

One taskserve process serves variants of the torch entries (all-MiniLM-L6-v2 and
EfficientNet-Lite0, typed services): ``-gpu`` (fp16 on GPU 0, dynamic batching),
``-gpu-mbs1`` (the same with ``max_batch_size: 1``) and ``-cpu`` (the same server on the
machine's CPU cores, fp32). Each variant is measured closed-loop at every concurrency;
then, when a SmolLM2 text-generation entry is given, decode throughput with 1/8/32
concurrent streams. Each part that fails is logged and recorded; the rest go on.

Writes ``gpu-<name>.json`` and ``gpu-<name>.md`` into ``--out`` and prints the ratios
against the targets (docs/gpu.md). ``--budget-s`` bounds the whole run: points that no
longer fit are skipped and marked so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np
import yaml

from taskserve.benchmarks.generation_bench import room_for_streams
from taskserve.benchmarks.loadgen import Call, WindowPlan, run_closed_loop
from taskserve.benchmarks.peer_servers import PeerProcess, link_tree, spawn_taskserve
from taskserve.benchmarks.stats import LatencySummary, Window
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2 as ic
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2_grpc as ic_grpc
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc

MODELS = {"minilm": "all-MiniLM-L6-v2-torch", "efficientnet": "efficientnet-lite0-torch"}
# (ratio, goal) from the issue; all "higher is better".
TARGETS = {
    "minilm_c64_batched_vs_mbs1": 5.0,
    "minilm_c64_gpu_fp16_vs_cpu": 20.0,
    "efficientnet_c64_gpu_fp16_vs_cpu": 20.0,
    "smollm2_32_streams_vs_1": 10.0,
}
WORDS = (
    "the model server batches requests from many callers on one device while the queue stays short and "
    "latency stays low under load when the gpu computes whole batches at once instead of single rows"
).split()


@dataclass
class Point:
    model: str
    variant: str
    concurrency: int
    items_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    note: str = ""


VARIANTS: dict[str, dict[str, Any]] = {
    "gpu": {"gpus": [0]},
    "gpu-mbs1": {"gpus": [0], "max_batch_size": 1},
    "cpu": {"runtime": {"torch": {"device": "cpu"}}},
    "cpu-mbs1": {"runtime": {"torch": {"device": "cpu"}}, "max_batch_size": 1},
}


def variant_repository(models: Path, root: Path, wanted: Sequence[str]) -> dict[str, list[str]]:
    """``root`` gets the variants of each torch entry found in ``models``; returns
    {model key: [variant entry names]}."""
    made: dict[str, list[str]] = {}
    for key, entry in MODELS.items():
        source = models / entry
        if not (source / "config.yaml").is_file():
            continue
        base = yaml.safe_load((source / "config.yaml").read_text())
        base.pop("name", None)
        variants = {name: VARIANTS[name] for name in wanted}
        made[key] = []
        for suffix, change in variants.items():
            config = json.loads(json.dumps(base))
            for k, v in change.items():
                config[k] = {**config.get(k, {}), **v} if isinstance(v, dict) else v
            if config.get("max_batch_size") == 1:
                config.pop("dynamic_batching", None)
            dest = root / f"{entry}-{suffix}"
            dest.mkdir(parents=True)
            for item in source.iterdir():
                if item.name != "config.yaml":
                    link_tree(item, dest / item.name)
            (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            made[key].append(dest.name)
    return made


def decode_entry(source: Path, dest: Path, streams: int, cuda_graphs: bool = False) -> dict[str, Any]:
    """The text-generation entry for the decode part, with room for ``streams`` sequences on
    the generation engine (the demo writes 16), optionally with CUDA graphs for decode (torch
    entries); returns the config written."""
    config: dict[str, Any] = yaml.safe_load((source / "config.yaml").read_text())
    config.pop("name", None)  # the entry may live under another directory name
    if cuda_graphs:
        torch_options = config.setdefault("runtime", {}).setdefault("torch", {})
        torch_options["cuda_graphs"] = True
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.yaml":
            link_tree(item, dest / item.name)
    generation = config.get("generation")
    if generation is not None:
        room_for_streams(generation, streams)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def wait_loaded(server: PeerProcess, names: Sequence[str], timeout: float) -> dict[str, str]:
    """Wait until every model is READY or UNAVAILABLE; {name: reason} of those not READY."""
    import grpc

    from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
    from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc

    deadline = time.monotonic() + timeout
    states: dict[str, tuple[str, str]] = {}
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                return {n: f"the server exited ({server.proc.returncode})" for n in names}
            try:
                index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
                states = {m.name: (m.state, m.reason) for m in index}
            except grpc.RpcError:
                states = {}
            if states and all(states.get(n, ("", ""))[0] in ("READY", "UNAVAILABLE") for n in names):
                break
            time.sleep(0.5)
    return {n: states.get(n, ("LOADING", "not loaded in time"))[1] or "not ready" for n in names
            if states.get(n, ("", ""))[0] != "READY"}  # fmt: skip


def sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(12, 24)))) for _ in range(count)]


def images(count: int, seed: int = 0) -> list[common.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        pixels = rng.integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
        out.append(common.Image(raw=common.RawImage(height=224, width=224, channels=3, data=pixels.tobytes())))
    return out


def make_call(channel: grpc.aio.Channel, key: str, model: str, timeout_s: float) -> Call:
    ref = common.ModelRef(name=model)
    if key == "minilm":
        embed = se_grpc.SentenceEmbeddingStub(channel).Embed
        texts = sentences(256)

        async def call_embed(i: int) -> object:
            return await embed(se.EmbedRequest(model=ref, texts=[texts[i % len(texts)]]), timeout=timeout_s)

        return call_embed
    classify = ic_grpc.ImageClassificationStub(channel).Classify
    pics = images(32)

    async def call_classify(i: int) -> object:
        request = ic.ClassifyImageRequest(model=ref, images=[pics[i % len(pics)]], top_k=1)
        return await classify(request, timeout=timeout_s)

    return call_classify


def summarize(windows: Sequence[Window], point: Point, items_per_call: int = 1) -> Point:
    latencies = [x for w in windows for x in w.latencies_s]
    duration = sum(w.duration_s for w in windows)
    errors: dict[str, int] = {}
    for w in windows:
        for code, n in w.errors.items():
            errors[code] = errors.get(code, 0) + n
    lat = LatencySummary.of(latencies)
    point.items_per_s = round(len(latencies) * items_per_call / duration, 2) if duration > 0 else 0.0
    point.p50_ms, point.p99_ms = round(lat.p50, 2), round(lat.p99, 2)
    point.requests, point.errors = len(latencies), errors
    return point


async def measure_models(
    server: PeerProcess, made: dict[str, list[str]], concurrency: Sequence[int], plan: WindowPlan,
    deadline: float, log: Callable[[str], None],
) -> list[Point]:  # fmt: skip
    points: list[Point] = []
    per_point = plan.warmup_s + plan.window_s * plan.max_windows + 1
    async with grpc.aio.insecure_channel(server.address) as channel:
        for key, variants in made.items():
            for variant in variants:
                call = make_call(channel, key, variant, timeout_s=60)
                for c in concurrency:
                    point = Point(key, variant.rsplit("-torch-", 1)[-1], c)
                    if time.monotonic() + per_point > deadline:
                        point.note = "skipped: over the time budget"
                    else:
                        try:
                            summarize(await run_closed_loop(call, c, plan), point)
                        except Exception as err:  # one failing point must not end the run
                            point.note = f"failed: {type(err).__name__}: {err}"[:300]
                    points.append(point)
                    log(f"{key:13s} {point.variant:9s} c={c:<3d} {point.items_per_s:9.1f} items/s  "
                        f"p50 {point.p50_ms:8.2f} ms  p99 {point.p99_ms:8.2f} ms {point.note}")  # fmt: skip
    return points


async def measure_decode(
    address: str, model: str, streams: Sequence[int], tokens: int, seconds: float, deadline: float,
    log: Callable[[str], None], variant: str = "decode",
) -> list[Point]:  # fmt: skip
    """Generated tokens per second with N concurrent greedy streams of ``tokens`` new tokens each.
    Each point first runs one generation per stream (CUDA graphs of its shapes get captured
    there, not in the window)."""
    points = []
    prompts = sentences(64, seed=1)
    async with grpc.aio.insecure_channel(address) as channel:
        generate = tg_grpc.TextGenerationStub(channel).Generate
        ref = common.ModelRef(name=model)

        async def one(i: int) -> int:
            prompt = prompts[i % len(prompts)]
            request = tg.GenerateRequest(model=ref, prompt=prompt, max_new_tokens=tokens, temperature=0)
            count = 0
            async for reply in generate(request, timeout=120):
                count += len(reply.token_ids)
            return count

        for n in streams:
            point = Point("smollm2", variant, n)
            if time.monotonic() + seconds + 5 > deadline:
                point.note = "skipped: over the time budget"
                points.append(point)
                continue
            try:
                await asyncio.gather(*(one(i) for i in range(n)))  # warm-up
                started = time.perf_counter()
                latencies: list[float] = []
                counts = await asyncio.gather(*(_stream(one, s, n, started + seconds, latencies) for s in range(n)))
                elapsed = time.perf_counter() - started
                lat = LatencySummary.of(latencies)
                point.items_per_s = round(sum(counts) / elapsed, 1)
                point.p50_ms, point.p99_ms, point.requests = round(lat.p50, 1), round(lat.p99, 1), len(latencies)
            except Exception as err:
                point.note = f"failed: {type(err).__name__}: {err}"[:300]
            points.append(point)
            log(f"smollm2 {variant} streams={n:<3d} {point.items_per_s:9.1f} tokens/s  "
                f"p50 {point.p50_ms:8.1f} ms/request {point.note}")  # fmt: skip
    return points


async def _stream(
    one: Callable[[int], Any], index: int, streams: int, until: float, latencies: list[float]
) -> int:
    """One stream: generations back to back until ``until``; returns the tokens generated."""
    total, i = 0, index
    while time.perf_counter() < until:
        t0 = time.perf_counter()
        total += await one(i)
        latencies.append(time.perf_counter() - t0)
        i += streams
    return total


def _find(points: Sequence[Point], model: str, variant: str, c: int) -> float:
    return next((p.items_per_s for p in points if (p.model, p.variant, p.concurrency) == (model, variant, c)), 0.0)


def ratios(points: Sequence[Point], top: int) -> dict[str, float | None]:
    def ratio(a: float, b: float) -> float | None:
        return round(a / b, 2) if a > 0 and b > 0 else None

    streams = sorted({p.concurrency for p in points if p.model == "smollm2" and p.variant == "decode"})
    return {
        "minilm_c64_batched_vs_mbs1": ratio(
            _find(points, "minilm", "gpu", top), _find(points, "minilm", "gpu-mbs1", top)
        ),
        "minilm_c64_gpu_fp16_vs_cpu": ratio(_find(points, "minilm", "gpu", top), _find(points, "minilm", "cpu", top)),
        "efficientnet_c64_gpu_fp16_vs_cpu": ratio(
            _find(points, "efficientnet", "gpu", top), _find(points, "efficientnet", "cpu", top)
        ),
        "smollm2_32_streams_vs_1": ratio(
            _find(points, "smollm2", "decode", streams[-1]) if streams else 0.0, _find(points, "smollm2", "decode", 1)
        ),
    }


def markdown(meta: dict[str, Any], points: Sequence[Point], found: dict[str, float | None]) -> str:
    lines = [f"# GPU benchmark: {meta['name']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items() if k not in ("name", "failures")]
    lines += [f"- failed: {f.splitlines()[0]}" for f in meta.get("failures", [])]
    lines += ["", "| model | variant | concurrency | items/s | p50 ms | p99 ms | requests | errors | note |",
              "|---|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for p in points:
        errors = ", ".join(f"{k} {v}" for k, v in p.errors.items())
        lines.append(
            f"| {p.model} | {p.variant} | {p.concurrency} | {p.items_per_s:.1f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
            f"{p.requests} | {errors} | {p.note} |"
        )
    lines += ["", "| ratio | measured | target | met |", "|---|---:|---:|---|"]
    for name, goal in TARGETS.items():
        got = found.get(name)
        met = "n/a" if got is None else ("yes" if got >= goal else "no")
        lines.append(f"| {name} | {got if got is not None else 'n/a'} | >= {goal:g} | {met} |")
    lines += ["", "items/s: embeddings or images per second (one per request); decode: generated tokens per second."]
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "host_cpus": __import__("os").cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception as err:  # the report says what was missing
        info["torch"] = f"unavailable ({type(err).__name__})"
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taskserve.benchmarks.gpu_bench", description=__doc__.splitlines()[0])
    p.add_argument("--models", type=Path, required=True, help="repository holding the torch entries")
    p.add_argument("--smollm2", default="", help="name of a text-generation entry in --models (optional)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--name", default="h200")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--streams", default="1,8,32")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-seconds", type=float, default=8.0)
    p.add_argument("--decode-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="also decode with CUDA graphs (a second entry with runtime.torch.cuda_graphs)")
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--window-s", type=float, default=3.0)
    p.add_argument("--variants", default="gpu,gpu-mbs1,cpu", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--budget-s", type=float, default=300.0, help="stop starting new points after this long")
    p.add_argument("--startup-timeout", type=float, default=240.0)
    args = p.parse_args(argv)
    started = time.monotonic()
    deadline = started + args.budget_s
    concurrency = [int(x) for x in args.concurrency.split(",") if x]
    streams = [int(x) for x in args.streams.split(",") if x]
    args.out.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="taskserve-gpu-bench-"))
    points: list[Point] = []
    failures: list[str] = []
    server: PeerProcess | None = None
    try:
        repo = work / "repo"
        repo.mkdir()
        unknown = set(args.variants.split(",")) - set(VARIANTS)
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}; choose from {list(VARIANTS)}")
        made = variant_repository(args.models, repo, args.variants.split(","))
        generation: dict[str, Any] = {}
        graphs_entry = ""
        if args.smollm2 and (args.models / args.smollm2).is_dir():
            written = decode_entry(args.models / args.smollm2, repo / args.smollm2, max(streams, default=1))
            generation = dict(written.get("generation") or {})
            log(f"{args.smollm2}: generation {generation or 'none (steps through the batcher)'}")
            if generation and args.decode_graphs and written.get("platform") == "torch":
                graphs_entry = f"{args.smollm2}-graphs"
                decode_entry(args.models / args.smollm2, repo / graphs_entry, max(streams, default=1), cuda_graphs=True)
        elif args.smollm2:
            failures.append(f"smollm2: no entry {args.smollm2!r} in {args.models}")
        if not made:
            failures.append(f"no torch entries ({', '.join(MODELS.values())}) in {args.models}")
        log(f"variants: {made}")
        server = spawn_taskserve(repo, work)
        names = [v for variants in made.values() for v in variants] + [n for n in (args.smollm2, graphs_entry) if n]
        not_ready = wait_loaded(server, names, args.startup_timeout)
        for name, reason in not_ready.items():
            failures.append(f"{name} not ready: {reason}")
        made = {k: [v for v in vs if v not in not_ready] for k, vs in made.items()}
        log(f"server up ({server.address}); not ready: {not_ready or 'none'}")
        plan = WindowPlan(warmup_s=args.warmup_s, window_s=args.window_s, max_windows=2, stable_windows=1)
        try:
            points += asyncio.run(measure_models(server, made, concurrency, plan, deadline, log))
        except Exception as err:
            failures.append(f"models: {type(err).__name__}: {err}")
            traceback.print_exc()
        if args.smollm2 and (repo / args.smollm2).exists() and args.smollm2 not in not_ready:
            try:
                points += asyncio.run(
                    measure_decode(server.address, args.smollm2, streams, args.decode_tokens, args.decode_seconds,
                                   deadline, log)
                )  # fmt: skip
                if graphs_entry and graphs_entry not in not_ready:
                    # The same with CUDA graphs, at the ends of the range (after the ratio's points).
                    points += asyncio.run(
                        measure_decode(server.address, graphs_entry, sorted({min(streams), max(streams)}),
                                       args.decode_tokens, args.decode_seconds, deadline, log, "decode-graphs")
                    )  # fmt: skip
            except Exception as err:
                failures.append(f"smollm2: {type(err).__name__}: {err}"[:300])
    finally:
        if server is not None:
            log_tail = server.log_tail(40)
            server.stop()
            if failures:
                failures.append("server log tail:\n" + log_tail)
        shutil.rmtree(work, ignore_errors=True)
    found = ratios(points, max(concurrency) if concurrency else 64)
    meta = {"name": args.name, "machine": machine(), "seconds": round(time.monotonic() - started, 1),
            "concurrency": concurrency, "window_s": args.window_s, "smollm2_generation": generation,
            "failures": failures}  # fmt: skip
    result = {**meta, "points": [vars(pt) for pt in points], "ratios": found, "targets": TARGETS}
    (args.out / f"gpu-{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"gpu-{args.name}.md").write_text(markdown(meta, points, found))
    log(f"ratios: {found}")
    for failure in failures:
        log(f"FAILED {failure}")
    return 1 if failures or not points else 0


if __name__ == "__main__":
    sys.exit(main())
