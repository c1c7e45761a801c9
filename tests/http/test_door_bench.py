"""``taskserve-bench doors``: both doors driven with the same client logic against a real
server on SmolLM2 generate the same greedy tokens per stream (so the comparison is of doors,
not of work); the CLI has the mode. No timing is asserted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.door_bench import compare_doors, grpc_streamer, openai_streamer
from taskserve.clients import ClientOptions, TaskServeClient
from taskserve.exporters.demo import ENTRY_NAMES
from tests.support.server import ServerThread, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SMOL = ENTRY_NAMES["smollm2"]


@pytest.fixture(scope="module")
def server(openai_repository: Path) -> Iterator[ServerThread]:
    with running_server(openai_repository, http_port=0) as s:
        yield s


def test_both_doors_stream_the_same_tokens_with_the_same_client_logic(server: ServerThread) -> None:
    assert server.app is not None
    base = f"http://127.0.0.1:{server.app.http_port}/v1"
    with (
        TaskServeClient(server.address, ClientOptions(timeout_s=120)) as typed,
        openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120) as sdk,
    ):
        doors = {"grpc": grpc_streamer(typed, SMOL), "http": openai_streamer(sdk, SMOL)}
        prompts = ["The history of the Roman Empire", "Once upon a time, in a small village"]
        runs, ratios = compare_doors(doors, lambda n: prompts[:n], [1, 2], new_tokens=8, repeats=1)
        first = doors["http"](prompts[0], 8)
    assert [r.server for r in runs] == ["grpc-streams-1", "http-streams-1", "grpc-streams-2", "http-streams-2"]
    assert [r.extra["tokens"] for r in runs] == [8, 8, 16, 16]
    assert set(ratios) == {"http_vs_grpc_streams_1", "http_vs_grpc_streams_2"} and all(v > 0 for v in ratios.values())
    assert first.tokens == 8 and first.prompt_tokens > 0 and 0 < first.first_s <= first.total_s


def test_cli_has_the_doors_mode() -> None:
    args = build_parser().parse_args(["doors", "--model-repository", "/r", "--streams", "1,8"])
    assert args.command == "doors" and args.streams == [1, 8] and args.repeats == 2
