"""Torch entries (``platform: torch``) served on the CPU in fp32: all-MiniLM-L6-v2 and
EfficientNet-Lite0 through the real server, equal to their ONNX Runtime entries."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from PIL import Image

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2 as ic
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2_grpc as ic_grpc
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
from tests.support.server import running_server

TEXTS = [
    "The cat sat on the mat.",
    "A feline was resting on the rug.",
    "Interest rates rose again, and markets fell sharply across the board for the third day in a row.",
    "ok",
]


@pytest.fixture(scope="session")
def torch_repository(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's ONNX entries (hard-linked: the server refuses symlinks out of its
    repository) beside torch entries of the same weights."""
    from taskserve.exporters.demo import build_demo

    repo = tmp_path_factory.mktemp("torch-repo")
    build_demo(repo, ["minilm-torch", "efficientnet-lite0-torch"])
    for name in ("all-MiniLM-L6-v2", "efficientnet-lite0"):
        shutil.copytree(demo_repository / name, repo / name, copy_function=os.link)
    return repo


@pytest.fixture(scope="module")
def channel(torch_repository: Path) -> Iterator[grpc.Channel]:
    with running_server(torch_repository) as server, grpc.insecure_channel(server.address) as ch:
        yield ch


def _embed(channel: grpc.Channel, model: str, texts: list[str]) -> np.ndarray:
    reply = se_grpc.SentenceEmbeddingStub(channel).Embed(
        se.EmbedRequest(model=common.ModelRef(name=model), texts=texts)
    )
    return np.array([e.values for e in reply.embeddings])


def test_the_entry_holds_safetensors_and_config_files(torch_repository: Path) -> None:
    entry = torch_repository / "all-MiniLM-L6-v2-torch"
    config = yaml.safe_load((entry / "config.yaml").read_text())
    assert config["platform"] == "torch" and config["default_model_filename"] == "torch_model.json"
    assert sorted(p.name for p in (entry / "1").iterdir()) == ["config.json", "model.safetensors", "torch_model.json"]
    assert not list(entry.rglob("*.onnx"))


def test_torch_minilm_equals_the_onnx_entry(channel: grpc.Channel) -> None:
    torch_vectors = _embed(channel, "all-MiniLM-L6-v2-torch", TEXTS)
    onnx_vectors = _embed(channel, "all-MiniLM-L6-v2", TEXTS)
    assert torch_vectors.shape == (4, 384)
    np.testing.assert_allclose(torch_vectors, onnx_vectors, atol=1e-4)
    # The paraphrase is the nearest neighbour of the first sentence.
    scores = torch_vectors[1:] @ torch_vectors[0]
    assert int(np.argmax(scores)) == 0


def test_concurrent_requests_batch_on_a_torch_entry(channel: grpc.Channel) -> None:
    alone = {t: _embed(channel, "all-MiniLM-L6-v2-torch", [t])[0] for t in TEXTS}
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: _embed(channel, "all-MiniLM-L6-v2-torch", [TEXTS[i % 4]]), range(32)))
    for i, reply in enumerate(replies):
        np.testing.assert_allclose(reply[0], alone[TEXTS[i % 4]], atol=1e-5)


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_typed_image_classification_on_a_torch_entry(channel: grpc.Channel) -> None:
    from skimage import data

    stub = ic_grpc.ImageClassificationStub(channel)
    images = [common.Image(encoded=_jpeg(data.chelsea())), common.Image(encoded=_jpeg(data.coffee()))]
    results = {}
    for model in ("efficientnet-lite0-torch", "efficientnet-lite0"):
        reply = stub.Classify(ic.ClassifyImageRequest(model=common.ModelRef(name=model), images=images, top_k=3))
        results[model] = reply.results
    cat, cup = results["efficientnet-lite0-torch"]
    assert cat.labels[0].label.lower() == "egyptian cat" or "cat" in cat.labels[0].label.lower()
    assert "espresso" in cup.labels[0].label.lower()
    for got, want in zip(results["efficientnet-lite0-torch"], results["efficientnet-lite0"], strict=True):
        assert [x.index for x in got.labels] == [x.index for x in want.labels]
        np.testing.assert_allclose([x.score for x in got.labels], [x.score for x in want.labels], atol=1e-4)


def test_v2_model_config_names_each_entrys_backend_and_where_it_runs(channel: grpc.Channel) -> None:
    from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
    from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
    from taskserve.protocol.generated.inference import model_config_pb2 as mc

    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    seen = {}
    for entry in index.models:
        config = stub.ModelConfig(pb.ModelConfigRequest(name=entry.name)).config
        seen[config.platform] = config.backend
        # This machine has no GPU: every instance runs on the CPU, and says so.
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_CPU], entry.name
    assert seen == {"onnxruntime_onnx": "onnxruntime", "pytorch": "pytorch"}
