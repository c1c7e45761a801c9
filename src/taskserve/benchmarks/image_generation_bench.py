"""``taskserve-bench image-generation``: step-level batching of a diffusion pipeline.

A small Stable Diffusion pipeline (built from configs, random weights, sized so one
64x64 image takes about a second on a 2-core CPU; or ``--pipeline DIR``) is exported and
served by a ``taskserve-server`` process. Each repeat alternates three measurements:

  sequential   TextToImage streams one at a time (time per step, time to first progress)
  concurrent   ``--concurrency`` streams at once: their steps share UNet batches
  diffusers    diffusers' torch pipeline in-process, same weights, size, steps, scheduler

Targets (ratios of medians within one run): concurrent images/s >= 2x sequential, and one
request through the server >= 1.2x diffusers' pipeline in-process (images/s).
Results: benchmarks/results/<name>.json, .md and .png.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskserve.benchmarks.cli_args import add_allow_dirty
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.report import DEFAULT_OUT, write_results
from taskserve.benchmarks.stats import LatencySummary, RunResult, Window

MODEL = "bench-sd"
BATCHING_GOAL = 2.0
SERVER_GOAL = 1.2
PROMPT, NEGATIVE = "a red cat on a blue mat", "blurry"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("image-generation", help="diffusion: step-level batching, server vs diffusers in-process")
    p.add_argument("--pipeline", type=Path, help="a StableDiffusionPipeline folder (default: build the bench config)")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels (64)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps per image (50)")
    p.add_argument("--scheduler", default="ddim", choices=["ddim", "euler", "dpm-solver++"])
    p.add_argument("--guidance-scale", type=float, default=7.5, help="> 1: two UNet rows per image (7.5)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent streams (4)")
    p.add_argument("--requests", type=int, default=8, help="images per measurement (8)")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the three measurements (3)")
    p.add_argument(
        "--torch-threads", type=int, default=0, help="diffusers' torch threads (0: the faster of 1 and one per core)"
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--name", default="image-generation-tiny-sd")
    add_allow_dirty(p)


def _window(elapsed: float, latencies: list[float], errors: dict[str, int]) -> Window:
    return Window(duration_s=elapsed, latencies_s=tuple(latencies), errors=errors)


def _result(server: str, mode: str, load: float, window: Window, repeat: int, extra: dict[str, Any]) -> RunResult:
    return RunResult(
        server=server, mode=mode, load=load, items_per_request=1, windows=(window,), measured=(window,),
        stable=True, repeat=repeat, extra=extra,
    )  # fmt: skip


async def _stream_one(client: Any, args: argparse.Namespace, seed: int) -> tuple[float, float, list[float]]:
    """(latency, time to first progress, step intervals) of one streamed TextToImage, seconds."""
    from taskserve.clients.image_generation import ImageProgress

    start = time.perf_counter()
    first = 0.0
    last = start
    intervals: list[float] = []
    async for event in client.image_generation.text_to_image_stream(
        PROMPT, model=MODEL, negative_prompt=NEGATIVE, width=args.size, height=args.size, steps=args.steps,
        guidance_scale=args.guidance_scale, seed=seed, scheduler=args.scheduler, timeout=600,
    ):  # fmt: skip
        now = time.perf_counter()
        if isinstance(event, ImageProgress):
            if event.step == 1:
                first = now - start
            else:
                intervals.append(now - last)
            last = now
    return time.perf_counter() - start, first, intervals


async def _server_run(address: str, args: argparse.Namespace, concurrency: int, repeat: int) -> RunResult:
    from taskserve.clients import AsyncTaskServeClient

    latencies: list[float] = []
    firsts: list[float] = []
    steps: list[float] = []
    errors: dict[str, int] = {}
    seeds = iter(range(repeat * 1000, repeat * 1000 + args.requests))

    async with AsyncTaskServeClient(address) as client:

        async def worker() -> None:
            for seed in seeds:
                try:
                    latency, first, intervals = await _stream_one(client, args, seed)
                except Exception as err:  # counted, the run goes on
                    errors[type(err).__name__] = errors.get(type(err).__name__, 0) + 1
                    continue
                latencies.append(latency)
                firsts.append(first)
                steps.extend(intervals)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    step = LatencySummary.of(steps)
    extra = {
        "step_p50_ms": round(step.p50, 2), "step_p99_ms": round(step.p99, 2),
        "first_progress_p50_ms": round(LatencySummary.of(firsts).p50, 2),
        "first_progress_p99_ms": round(LatencySummary.of(firsts).p99, 2),
    }  # fmt: skip
    mode = "sequential" if concurrency == 1 else "concurrent"
    return _result("taskserve", mode, concurrency, _window(elapsed, latencies, errors), repeat, extra)


def _diffusers_run(pipe: Any, args: argparse.Namespace, repeat: int) -> RunResult:
    import diffusers
    import torch

    from taskserve.exporters.diffusion import TORCH_SCHEDULERS
    from taskserve.server.tasks.diffusion.schedulers import SchedulerKind

    cls = getattr(diffusers, TORCH_SCHEDULERS[SchedulerKind(args.scheduler)])
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    latencies = []
    start = time.perf_counter()
    for i in range(args.requests):
        t0 = time.perf_counter()
        with torch.inference_mode():
            pipe(
                PROMPT, negative_prompt=NEGATIVE, height=args.size, width=args.size, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, generator=torch.Generator().manual_seed(repeat * 1000 + i),
                output_type="np",
            )  # fmt: skip
        latencies.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - start
    return _result("diffusers-torch", "in-process", 1, _window(elapsed, latencies, {}), repeat, {})


def _median_rate(runs: Sequence[RunResult], server: str, mode: str) -> float:
    rates = [r.items_per_s for r in runs if r.server == server and r.mode == mode]
    return statistics.median(rates) if rates else 0.0


def summarize(runs: Sequence[RunResult], concurrency: int) -> tuple[dict[str, object], list[str]]:
    sequential = _median_rate(runs, "taskserve", "sequential")
    concurrent = _median_rate(runs, "taskserve", "concurrent")
    torch_rate = _median_rate(runs, "diffusers-torch", "in-process")
    batching = concurrent / sequential if sequential else 0.0
    versus = sequential / torch_rate if torch_rate else 0.0
    seq_runs = [r for r in runs if r.mode == "sequential"]
    step_p50 = statistics.median(float(r.extra["step_p50_ms"]) for r in seq_runs) if seq_runs else 0.0
    first = statistics.median(float(r.extra["first_progress_p50_ms"]) for r in seq_runs) if seq_runs else 0.0
    ratios = {
        "sequential_images_per_s": round(sequential, 3), "concurrent_images_per_s": round(concurrent, 3),
        "diffusers_images_per_s": round(torch_rate, 3), "batching_ratio": round(batching, 3),
        "server_vs_diffusers": round(versus, 3), "sequential_step_p50_ms": round(step_p50, 2),
        "sequential_first_progress_p50_ms": round(first, 2),
    }  # fmt: skip
    notes = [
        f"{concurrency} concurrent / one at a time (images/s): {batching:.2f} "
        f"(>= {BATCHING_GOAL}: {'met' if batching >= BATCHING_GOAL else 'NOT met'})",
        f"server one at a time / diffusers in-process (images/s): {versus:.2f} "
        f"(>= {SERVER_GOAL}: {'met' if versus >= SERVER_GOAL else 'NOT met'})",
        f"time per step p50 {step_p50:.1f} ms (one at a time); time to first progress p50 {first:.1f} ms",
        "random weights built from configs: speed only, never image quality",
    ]
    return {"ratios": ratios}, notes


def run_image_generation(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    from taskserve.benchmarks.peer_servers import spawn_taskserve
    from taskserve.exporters.diffusion import export_diffusers, load_pipeline
    from taskserve.exporters.tiny_diffusion import BENCH, tiny_stable_diffusion

    if min(args.size, args.steps, args.concurrency, args.requests, args.repeats) < 1:
        raise ValueError("--size, --steps, --concurrency, --requests and --repeats must be >= 1")
    runs: list[RunResult] = []
    with tempfile.TemporaryDirectory(prefix="taskserve-imagegen-bench-") as tmp:
        work = Path(tmp)
        source = args.pipeline or tiny_stable_diffusion(work / "pipeline", size=BENCH)
        repo = work / "repo"
        export_diffusers(
            source, repo, MODEL, max_batch_size=max(8, 2 * args.concurrency), validate=False, progress=False
        )
        pipe = load_pipeline(source)
        server = spawn_taskserve(repo, work)
        try:
            server.wait_ready(MODEL, timeout=300)
            # One warm-up request per path (sessions, allocators, the diffusers pipeline).
            asyncio.run(_server_run(server.address, argparse.Namespace(**{**vars(args), "requests": 1}), 1, 99))
            threads = _fastest_torch_threads(pipe, args)
            for repeat in range(args.repeats):
                runs.append(asyncio.run(_server_run(server.address, args, 1, repeat)))
                runs.append(asyncio.run(_server_run(server.address, args, args.concurrency, repeat)))
                runs.append(_diffusers_run(pipe, args, repeat))
                print(
                    f"repeat {repeat}: sequential {runs[-3].items_per_s:.2f} img/s, "
                    f"concurrent {runs[-2].items_per_s:.2f} img/s, diffusers {runs[-1].items_per_s:.2f} img/s"
                )
        finally:
            server.stop()
    extra, notes = summarize(runs, args.concurrency)
    for note in notes:
        print(note)
    config = {
        "pipeline": str(args.pipeline or "tiny_stable_diffusion(BENCH)"), "size": args.size, "steps": args.steps,
        "scheduler": args.scheduler, "guidance_scale": args.guidance_scale, "concurrency": args.concurrency,
        "requests": args.requests, "repeats": args.repeats, "torch_threads": threads,
        "cpus": os.cpu_count(),
    }  # fmt: skip
    paths = write_results(
        args.name, runs, config=config, machine=machine_info(), out_dir=args.out, extra=extra, notes=notes
    )
    return runs, paths


def _fastest_torch_threads(pipe: Any, args: argparse.Namespace) -> int:
    """Give diffusers its best thread count: torch's default (one per core) collapses when
    other processes load the cores (OpenMP threads spin), one thread does not. Each is
    timed on one warm request; the faster stays set for the measurements."""
    import torch

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        _diffusers_run(pipe, argparse.Namespace(**{**vars(args), "requests": 1}), 99)
        return int(args.torch_threads)
    one = argparse.Namespace(**{**vars(args), "requests": 1})
    timings = {}
    for threads in sorted({1, os.cpu_count() or 1}):
        torch.set_num_threads(threads)
        _diffusers_run(pipe, one, 99)  # warm-up at this thread count
        timings[threads] = _diffusers_run(pipe, one, 98).latencies_s[0]
    best = min(timings, key=lambda t: timings[t])
    torch.set_num_threads(best)
    print(f"diffusers: {best} torch threads (seconds per image by threads: {timings})")
    return best


__all__ = ["build_parser", "run_image_generation", "summarize"]
