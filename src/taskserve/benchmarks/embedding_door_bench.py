"""``taskserve-bench embedding-doors``: one sentence-embedding model through every door of one
server: KServe v2 over gRPC and over HTTP (the binary tensor extension, as ``tritonclient.http``
sends it), the typed SentenceEmbedding service, and the OpenAI ``/v1/embeddings`` route.

Closed loop at each concurrency (``--concurrency``, default 1,8,32), the doors alternating within
every repeat, each door fed the same sentences. Two pairs do equal work and give the ratios the
issue's goal reads (>= 0.8):

- ``v2-http`` / ``v2-grpc``: the same token-id tensors in, the same ``sentence_embedding`` out;
- ``openai-http`` / ``typed-grpc``: the same text in (the server tokenizes), one vector out.

``openai-http`` / ``v2-grpc`` is reported too, as the issue names it, but it is not equal work:
the OpenAI route tokenizes on the server, the v2 caller sent token ids.

Every HTTP door uses one ``httpx.AsyncClient`` (a keep-alive connection per concurrent caller),
every gRPC door one channel, all in this process: the client's own cost (JSON, protobuf) is part
of what each door costs a caller. Noisy on a shared machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from taskserve.benchmarks.cli_args import add_measurement_args, int_list, plan_from
from taskserve.benchmarks.loadgen import Call
from taskserve.benchmarks.machine import machine_info
from taskserve.benchmarks.payloads import Payload, build_payload
from taskserve.benchmarks.peer_servers import free_port, spawn_taskserve, write_entry_variant
from taskserve.benchmarks.peer_summary import paired_point
from taskserve.benchmarks.report import write_results
from taskserve.benchmarks.stats import RunResult
from taskserve.benchmarks.sweep import SweepTarget, run_sweep
from taskserve.benchmarks.targets import bench_channel, typed_call
from taskserve.clients import AsyncTaskServeClient
from taskserve.clients.options import ClientOptions
from taskserve.clients.v2_codec import encode_infer_request
from taskserve.protocol.datatypes import v2_datatype
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as v2_grpc

# Each HTTP door's throughput over its gRPC counterpart's, per concurrency (issue 20).
GOAL = 0.8
OUTPUT = "sentence_embedding"
# (numerator door, denominator door, equal work?)
PAIRS = (("v2-http", "v2-grpc", True), ("openai-http", "typed-grpc", True), ("openai-http", "v2-grpc", False))


def build_parser(sub: Any) -> None:
    p = sub.add_parser(
        "embedding-doors", help="a sentence-embedding model through v2 gRPC, v2 REST, typed gRPC and /v1/embeddings"
    )
    p.add_argument("--model-repository", type=Path, required=True, help="repository holding the model")
    p.add_argument("--model", default="all-MiniLM-L6-v2")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="closed-loop callers, e.g. 1,8,32")
    p.add_argument("--repeats", type=int, default=2, help="rounds of every door at every concurrency (default 2)")
    p.add_argument("--batch-size", type=int, default=1, help="sentences per request (default 1)")
    p.add_argument("--num-requests", type=int, default=256, help="distinct requests each door cycles through")
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="per-request deadline, seconds")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    add_measurement_args(p)


def v2_grpc_call(channel: Any, model: str, payload: Payload, timeout_s: float) -> Call:
    """v2 ModelInfer asking for the pooled embedding only (what ``/v1/embeddings`` returns)."""
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    requests = [encode_infer_request(model, r, outputs=[OUTPUT]) for r in payload.requests]

    async def call(i: int) -> object:
        return await stub.ModelInfer(requests[i % len(requests)], timeout=timeout_s)

    return call


def v2_rest_body(inputs: Mapping[str, np.ndarray], output: str) -> tuple[bytes, dict[str, str]]:
    """A v2 REST infer body with the binary tensor data extension: a JSON header, then each
    input's raw little-endian bytes in order; the output asked for as binary too."""
    arrays = {name: np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")) for name, a in inputs.items()}
    header = {
        "inputs": [
            {"name": name, "shape": list(a.shape), "datatype": v2_datatype(a.dtype.newbyteorder("=")),
             "parameters": {"binary_data_size": a.nbytes}}
            for name, a in arrays.items()
        ],
        "outputs": [{"name": output, "parameters": {"binary_data": True}}],
    }  # fmt: skip
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    return head + b"".join(a.tobytes() for a in arrays.values()), headers


def read_v2_rest_output(response: httpx.Response, output: str) -> np.ndarray:
    """The named FP32 output of a v2 REST answer, binary or JSON."""
    response.raise_for_status()
    length = response.headers.get("Inference-Header-Content-Length")
    body = response.content
    head = json.loads(body[: int(length)] if length is not None else body)
    offset = int(length) if length is not None else 0
    for tensor in head["outputs"]:
        size = tensor.get("parameters", {}).get("binary_data_size")
        if tensor["name"] == output:
            if size is None:
                return np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
            return np.frombuffer(body, np.float32, int(size) // 4, offset).reshape(tensor["shape"])
        offset += int(size or 0)
    raise ValueError(f"the answer has no output {output!r}")


def v2_rest_call(http: httpx.AsyncClient, model: str, payload: Payload) -> Call:
    bodies = [v2_rest_body(r, OUTPUT) for r in payload.requests]
    path = f"/v2/models/{model}/infer"

    async def call(i: int) -> object:
        content, headers = bodies[i % len(bodies)]
        return read_v2_rest_output(await http.post(path, content=content, headers=headers), OUTPUT)

    return call


def openai_call(http: httpx.AsyncClient, model: str, payload: Payload) -> Call:
    """``/v1/embeddings`` with the payload's sentences, ``batch_size`` per request, as floats."""
    size = payload.batch_size
    batches = [list(payload.texts[i : i + size]) for i in range(0, len(payload.texts) - size + 1, size)]

    async def call(i: int) -> object:
        texts = batches[i % len(batches)]
        response = await http.post("/v1/embeddings", json={"model": model, "input": texts[0] if size == 1 else texts})
        response.raise_for_status()
        data = response.json()["data"]
        if len(data) != len(texts):
            raise ValueError(f"asked for {len(texts)} embeddings, got {len(data)}")
        return data

    return call


def door_ratios(runs: Sequence[RunResult]) -> dict[str, dict[str, float | int | bool | None]]:
    """Per pair and concurrency: the median over repeats of the paired throughput ratio, from
    repeats where both doors' runs were stable, error-free and served something."""
    by_point: dict[tuple[float, int], dict[str, RunResult]] = {}
    for run in runs:
        by_point.setdefault((run.load, run.repeat), {})[run.server] = run
    out: dict[str, dict[str, float | int | bool | None]] = {}
    for top, bottom, equal in PAIRS:
        for load in sorted({load for load, _ in by_point}):
            pairs = [
                (p[top], p[bottom])
                for (lo, _), p in sorted(by_point.items())
                if lo == load and top in p and bottom in p
            ]
            point = paired_point(pairs)
            out[f"{top} / {bottom} @ {load:g}"] = {
                "ratio": point.throughput_ratio_paired_median, "usable_repeats": point.usable_repeats,
                "repeats": point.repeats, "equal_work": equal, "failed": point.taskserve_failed + point.peer_failed,
            }  # fmt: skip
    return out


def verdicts(ratios: Mapping[str, Mapping[str, float | int | bool | None]]) -> list[str]:
    lines = []
    for key, r in ratios.items():
        work = "" if r["equal_work"] else " (not equal work: the OpenAI route also tokenizes)"
        if r["ratio"] is None:
            lines.append(f"{key}: no verdict, no stable error-free pair ({r['failed']} failed requests){work}")
            continue
        ratio = float(r["ratio"])
        met = "met" if ratio >= GOAL else "MISSED"
        lines.append(
            f"{key}: {ratio:.3f} (median of {r['usable_repeats']}/{r['repeats']} stable error-free repeats; "
            f">= {GOAL:g}: {met if r['equal_work'] else 'for reference'}){work}"
        )
    return lines


async def _sweep(
    args: argparse.Namespace, grpc_address: str, http_port: int, model_dir: Path
) -> tuple[list[RunResult], str]:
    channel = bench_channel(grpc_address, args.timeout)
    loads = sorted(set(args.concurrency))
    limits = httpx.Limits(max_connections=max(loads), max_keepalive_connections=max(loads))
    try:
        client = AsyncTaskServeClient(grpc_address, ClientOptions(timeout_s=args.timeout), channel=channel)
        await client.wait_until_ready(args.model, timeout=args.startup_timeout)
        specs = list((await client.model_metadata(args.model)).inputs)
        payload = build_payload(
            "text", specs, count=args.num_requests, batch_size=args.batch_size, min_tokens=args.min_tokens,
            max_tokens=args.max_tokens, model_dir=model_dir, seed=args.seed,
        )  # fmt: skip
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{http_port}", limits=limits, timeout=args.timeout
        ) as http:
            targets = [
                SweepTarget("v2-grpc", v2_grpc_call(channel, args.model, payload, args.timeout)),
                SweepTarget("v2-http", v2_rest_call(http, args.model, payload)),
                SweepTarget("typed-grpc", typed_call(channel, "embed", args.model, "", payload, args.timeout)),
                SweepTarget("openai-http", openai_call(http, args.model, payload)),
            ]
            runs = await run_sweep(
                targets, "closed", loads, plan_from(args), repeats=args.repeats,
                items_per_request=payload.batch_size, seed=args.seed, progress=not args.quiet,
            )  # fmt: skip
    finally:
        await channel.close()
    return runs, payload.description


def run_embedding_doors(args: argparse.Namespace) -> tuple[list[RunResult], dict[str, Path]]:
    model_dir: Path = args.model_repository / args.model
    if not (model_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{model_dir} is not a model entry (no config.yaml); build it with taskserve-export")
    say: Callable[[str], None] = (lambda _: None) if args.quiet else (lambda m: print(m, flush=True))
    work = Path(tempfile.mkdtemp(prefix="taskserve-embedding-doors-"))
    try:
        write_entry_variant(model_dir, work / "repo" / args.model, {})
        http_port = free_port()
        peer = spawn_taskserve(work / "repo", work, extra_args=("--http-port", str(http_port)))
        try:
            peer.wait_ready(args.model, args.startup_timeout)
            runs, payload = asyncio.run(_sweep(args, peer.address, http_port, model_dir))
        finally:
            peer.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = door_ratios(runs)
    notes = verdicts(ratios)
    for line in notes:
        say(line)
    config = {
        "mode": "embedding-doors", "model": args.model, "concurrency": sorted(set(args.concurrency)),
        "repeats": args.repeats, "payload": payload, "batch_size": args.batch_size, "plan": vars(plan_from(args)),
        "doors": {
            "v2-grpc": "v2 ModelInfer (grpc.aio stub), token ids in, sentence_embedding out",
            "v2-http": "POST /v2/models/{m}/infer, binary tensor extension, token ids in, sentence_embedding out",
            "typed-grpc": "taskserve.v1 SentenceEmbedding.Embed (grpc.aio stub), text in",
            "openai-http": "POST /v1/embeddings (httpx), text in, float vectors out",
        },
    }  # fmt: skip
    paths = write_results(
        args.name or f"embedding-doors-{args.model}", runs, config=config, machine=machine_info(), out_dir=args.out,
        extra={"ratios": ratios, "goal": GOAL}, notes=notes,
    )  # fmt: skip
    return runs, paths
