"""End to end: `taskserve-server` on the demo repository, driven over the v2 protocol."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from tokenizers import Tokenizer

from tests.support.server import ServerProcess


@pytest.fixture(scope="module")
def demo_server(demo_repository: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(demo_repository)
    try:
        client = tc.InferenceServerClient(server.address)
        deadline = time.monotonic() + 180
        while not client.is_server_ready():
            assert time.monotonic() < deadline, "".join(server.output)
            time.sleep(0.2)
        yield server
    finally:
        server.terminate()
        server.wait(60)
        server.kill()


def _embed(client: tc.InferenceServerClient, tokenizer: Tokenizer, sentences: list[str]) -> np.ndarray:
    tokenizer.no_padding()  # the packaged tokenizer.json pads to a fixed length
    encodings = tokenizer.encode_batch(sentences)
    width = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(sentences), width), np.int64)
    mask = np.zeros_like(ids)
    for row, enc in enumerate(encodings):
        ids[row, : len(enc.ids)] = enc.ids
        mask[row, : len(enc.ids)] = enc.attention_mask
    inputs = []
    for name, value in (("input_ids", ids), ("attention_mask", mask), ("token_type_ids", np.zeros_like(ids))):
        inputs.append(tc.InferInput(name, list(value.shape), "INT64"))
        inputs[-1].set_data_from_numpy(value)
    result = client.infer("all-MiniLM-L6-v2", inputs, outputs=[tc.InferRequestedOutput("sentence_embedding")])
    return result.as_numpy("sentence_embedding")


def test_demo_models_are_served(demo_server: ServerProcess) -> None:
    client = tc.InferenceServerClient(demo_server.address)
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index == {"all-MiniLM-L6-v2": "READY", "efficientnet-lite0": "READY"}


def test_minilm_embeddings_rank_a_paraphrase_first(demo_server: ServerProcess, demo_repository: Path) -> None:
    client = tc.InferenceServerClient(demo_server.address)
    tokenizer = Tokenizer.from_file(str(demo_repository / "all-MiniLM-L6-v2" / "tokenizer.json"))
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
        "Cats sleep most of the day.",
    ]
    emb = _embed(client, tokenizer, sentences)
    assert emb.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # normalized in the graph
    scores = emb[1:] @ emb[0]
    assert scores[0] > 0.6 and scores[0] > scores[1] + 0.3 and scores[0] > scores[2] + 0.3
    # The same sentence alone or padded inside a batch gives the same vector.
    alone = _embed(client, tokenizer, sentences[3:])
    np.testing.assert_allclose(alone[0], emb[3], atol=1e-4)
