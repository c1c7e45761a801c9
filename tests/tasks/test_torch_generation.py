"""A KV-cache decoder as a torch entry (``causal-lm``): the generation engine drives it with
the ONNX decoder's step tensors, and greedy decoding gives the ONNX entry's tokens, alone
and with concurrent generations whose steps share batches (left-padded past)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc

from tests.support.server import running_server

PROMPTS = ["The cat", "Once upon a time in a land far away", "x", "Hello there, how are"]


@pytest.fixture(scope="module")
def channel(
    tiny_sources: dict[str, Path], task_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[grpc.Channel]:
    from taskserve.exporters.api import export_hf

    repo = tmp_path_factory.mktemp("torch-generation")
    # Hard links, not a symlink: the server refuses model files that resolve outside its repository.
    shutil.copytree(task_repository / "tiny-llama", repo / "tiny-llama", copy_function=os.link)
    export_hf(tiny_sources["tiny-llama"], "text-generation", repo, "llama-torch", format="torch", progress=False)
    config_path = repo / "llama-torch" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    assert config["platform"] == "torch"
    # As the ONNX entry: steps run on the instance thread, so concurrent ones share batches.
    config["dynamic_batching"]["inline_compute_us"] = 0
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    with running_server(repo) as server, grpc.insecure_channel(server.address) as ch:
        yield ch


def _ids(channel: grpc.Channel, model: str, prompt: str) -> list[int]:
    stub = tg_grpc.TextGenerationStub(channel)
    request = tg.GenerateRequest(model=common.ModelRef(name=model), prompt=prompt, max_new_tokens=12, temperature=0)
    return [t for reply in stub.Generate(request, timeout=60) for t in reply.token_ids]


def test_greedy_tokens_equal_the_onnx_entry(channel: grpc.Channel) -> None:
    for prompt in PROMPTS:
        got = _ids(channel, "llama-torch", prompt)
        assert got and got == _ids(channel, "tiny-llama", prompt), prompt


def test_concurrent_generations_share_steps_and_stay_equal(channel: grpc.Channel) -> None:
    alone = {p: _ids(channel, "llama-torch", p) for p in PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: _ids(channel, "llama-torch", PROMPTS[i % 4]), range(8)))
    for i, ids in enumerate(together):
        assert ids == alone[PROMPTS[i % 4]]
