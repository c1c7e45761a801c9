"""``taskserve-bench embedding-doors``: its four doors, against a real server on the demo's
MiniLM, answer the same sentences with the same vectors (so its ratios compare doors, not
work), and its ratios come only from stable, error-free pairs. No timing is asserted."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.embedding_door_bench import (
    door_ratios,
    openai_call,
    v2_grpc_call,
    v2_rest_call,
    verdicts,
)
from taskserve.benchmarks.payloads import build_payload
from taskserve.benchmarks.stats import RunResult, Window
from taskserve.benchmarks.targets import bench_channel, typed_call
from taskserve.clients import TaskServeClient
from taskserve.exporters.demo import ENTRY_NAMES
from tests.support.server import ServerThread, running_server

MINILM = ENTRY_NAMES["minilm"]


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerThread]:
    with running_server(demo_repository, http_port=0) as s:
        yield s


def test_every_door_returns_the_same_embeddings(server: ServerThread, demo_repository: Path) -> None:
    assert server.app is not None
    with TaskServeClient(server.address) as client:
        specs = list(client.model_metadata(MINILM).inputs)
    payload = build_payload("text", specs, count=3, batch_size=2, model_dir=demo_repository / MINILM)

    async def answers() -> dict[str, list[np.ndarray]]:
        channel = bench_channel(server.address, 60)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.app.http_port}", timeout=60) as http:
                grpc_v2 = v2_grpc_call(channel, MINILM, payload, 60)
                rest_v2 = v2_rest_call(http, MINILM, payload)
                typed = typed_call(channel, "embed", MINILM, "", payload, 60)
                openai = openai_call(http, MINILM, payload)
                out: dict[str, list[np.ndarray]] = {"v2-grpc": [], "v2-http": [], "typed": [], "openai": []}
                for i in range(3):
                    reply = await grpc_v2(i)
                    raw = reply.raw_output_contents[0]  # type: ignore[attr-defined]
                    out["v2-grpc"].append(np.frombuffer(raw, np.float32).reshape(2, -1))
                    out["v2-http"].append(np.asarray(await rest_v2(i)))
                    typed_reply = await typed(i)
                    out["typed"].append(np.array([list(e.values) for e in typed_reply.embeddings], np.float32))  # type: ignore[attr-defined]
                    data = await openai(i)
                    out["openai"].append(np.array([d["embedding"] for d in data], np.float32))  # type: ignore[attr-defined]
                return out
        finally:
            await channel.close()

    out = asyncio.run(answers())
    for i in range(3):
        assert out["v2-grpc"][i].shape == (2, 384)
        np.testing.assert_array_equal(out["v2-http"][i], out["v2-grpc"][i])
        np.testing.assert_allclose(out["openai"][i], out["typed"][i], rtol=1e-6)
        # Same sentences, both tokenized: the text doors agree with the token-id doors.
        np.testing.assert_allclose(out["typed"][i], out["v2-grpc"][i], atol=1e-5)


def _run(server: str, load: float, repeat: int, items: int, stable: bool = True, errors: int = 0) -> RunResult:
    window = Window(1.0, (0.01,) * items, {"UNAVAILABLE": errors} if errors else {}, items_per_request=1)
    return RunResult(server, "closed", load, 1, (window,), (window,), stable, repeat)


def test_ratios_come_only_from_stable_error_free_pairs() -> None:
    runs = [
        _run("v2-grpc", 32, 0, 100), _run("v2-http", 32, 0, 90),
        _run("v2-grpc", 32, 1, 100), _run("v2-http", 32, 1, 10, stable=False),
        _run("typed-grpc", 32, 0, 100), _run("openai-http", 32, 0, 70, errors=3),
    ]  # fmt: skip
    ratios = door_ratios(runs)
    assert ratios["v2-http / v2-grpc @ 32"]["ratio"] == 0.9
    assert ratios["v2-http / v2-grpc @ 32"]["usable_repeats"] == 1
    assert ratios["openai-http / typed-grpc @ 32"]["ratio"] is None
    lines = verdicts(ratios)
    assert any(line.startswith("v2-http / v2-grpc @ 32: 0.900") and "met" in line for line in lines)
    assert any(line.startswith("openai-http / typed-grpc @ 32: no verdict") for line in lines)


def test_cli_has_the_embedding_doors_mode() -> None:
    args = build_parser().parse_args(["embedding-doors", "--model-repository", "/r", "--concurrency", "1,32"])
    assert args.command == "embedding-doors" and args.concurrency == [1, 32] and args.model == "all-MiniLM-L6-v2"
