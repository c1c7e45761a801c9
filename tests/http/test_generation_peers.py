"""The generation peer comparison's load client against real servers: taskserve's OpenAI door
on SmolLM2 (text prompts) and, opt-in, llama.cpp's server on the GGUF it ships (token-id
prompts). Both must read the same prompt lengths and generate exactly the tokens asked for,
which is what makes their timings comparable. No timing is asserted."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskserve.benchmarks.cli import main
from taskserve.benchmarks.generation_peers import chat_prompts, equal_work
from taskserve.benchmarks.openai_load import completion_body, run_streams
from taskserve.exporters.demo import ENTRY_NAMES
from tests.support.server import ServerThread, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SMOL = ENTRY_NAMES["smollm2"]


@pytest.fixture(scope="module")
def server(openai_repository: Path) -> Iterator[ServerThread]:
    with running_server(openai_repository, http_port=0) as s:
        yield s


def test_the_load_client_gets_equal_work_from_taskserves_door(server: ServerThread, openai_repository: Path) -> None:
    assert server.app is not None
    prompts = chat_prompts(openai_repository / SMOL, SMOL, 3)
    url = f"http://127.0.0.1:{server.app.http_port}/v1/completions"
    bodies = [completion_body(SMOL, p.text, 8) for p in prompts]  # text: the door takes no token ids
    wall, results = asyncio.run(run_streams(url, bodies, 2, timeout_s=120))
    assert [r.error for r in results] == [None, None, None]
    # The door tokenizes the templated text as the ids the peers are sent: same lengths.
    assert [r.prompt_tokens for r in results] == [len(p.ids) for p in prompts]
    assert equal_work(results, prompts, 8) == "yes"
    assert all(0 < r.ttft_s <= r.total_s <= wall and len(r.gaps_s) >= 1 for r in results)


@pytest.mark.peers
def test_llama_cpp_and_taskserve_side_by_side(openai_repository: Path, tmp_path: Path) -> None:
    # Opt-in (make test-peers): needs llama.cpp's server, which `make peers` builds.
    rc = main(["generation", "--peer", "llama.cpp", "--servers", "taskserve,llama.cpp-q4_1,llama.cpp-f16",
               "--model-repository", str(openai_repository), "--model", SMOL, "--prompts", "2",
               "--new-tokens", "8", "--streams", "1,2", "--repeats", "2", "--allow-dirty", "--quiet",
               "--out", str(tmp_path), "--name", "gp"])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "gp.json").read_text())
    assert {(r["server"], r["load"]) for r in doc["runs"]} == {
        (s, n) for s in ("taskserve", "llama.cpp-q4_1", "llama.cpp-f16") for n in (1, 2)
    }
    # Token ids to llama.cpp, text to taskserve: the same prompt lengths, 8 tokens each, no errors.
    assert all(r["equal_work"] == "yes" and r["errors"] == {} for r in doc["runs"])
    assert doc["config"]["prompt_form"] == {"taskserve": "text", "llama.cpp-q4_1": "ids", "llama.cpp-f16": "ids"}
    assert all(r["cores_busy"] > 0 for r in doc["runs"])
    assert (tmp_path / "gp.png").is_file() and "| llama.cpp-f16 | 2 |" in (tmp_path / "gp.md").read_text()
