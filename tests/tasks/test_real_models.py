"""The typed services on the real demo models: all-MiniLM-L6-v2 and EfficientNet-Lite0."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2 as ic
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2_grpc as ic_grpc
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
from tests.support.server import running_server

MINILM = common.ModelRef(name="all-MiniLM-L6-v2")
EFFNET = common.ModelRef(name="efficientnet-lite0")
# ImageNet-1k classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


@pytest.fixture(scope="module")
def demo_channel(demo_repository: Path) -> Iterator[grpc.Channel]:
    with running_server(demo_repository) as server, grpc.insecure_channel(server.address) as channel:
        yield channel


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def test_similarity_ranks_the_paraphrase_first(demo_channel: grpc.Channel) -> None:
    stub = se_grpc.SentenceSimilarityStub(demo_channel)
    candidates = [
        "Stock markets fell sharply on Monday.",
        "A feline was resting on the rug.",
        "How do I bake bread at home?",
        "The weather will be sunny tomorrow.",
    ]
    reply = stub.Compare(
        se.CompareSentencesRequest(model=MINILM, source="The cat sat on the mat.", candidates=candidates)
    )
    scores = list(reply.scores)
    assert int(np.argmax(scores)) == 1
    assert scores[1] > 0.4 and all(scores[1] - s > 0.2 for i, s in enumerate(scores) if i != 1)


def test_embed_real_model_dimension_and_batching(demo_channel: grpc.Channel) -> None:
    stub = se_grpc.SentenceEmbeddingStub(demo_channel)
    texts = ["The cat sat on the mat.", "A feline was resting on the rug.", "Interest rates rose again."]
    reply = stub.Embed(se.EmbedRequest(model=MINILM, texts=texts))
    assert reply.dimension == 384 and len(reply.embeddings) == 3
    vectors = np.array([e.values for e in reply.embeddings])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-4)
    single = np.array(
        [stub.Embed(se.EmbedRequest(model=MINILM, texts=[t])).embeddings[0].values for t in texts]
    )
    assert single == pytest.approx(vectors, abs=1e-4)


def test_classify_chelsea_as_a_cat(demo_channel: grpc.Channel) -> None:
    from skimage import data

    stub = ic_grpc.ImageClassificationStub(demo_channel)
    cat, coffee = data.chelsea(), data.coffee()
    images = [common.Image(encoded=_jpeg(cat)), common.Image(encoded=_jpeg(coffee))]
    reply = stub.Classify(ic.ClassifyImageRequest(model=EFFNET, images=images, top_k=5))
    chelsea, cup = reply.results
    assert len(chelsea.labels) == 5
    assert any(label.index in CAT_CLASSES for label in chelsea.labels)
    assert chelsea.labels[0].index in CAT_CLASSES
    assert "cat" in chelsea.labels[0].label.lower()
    assert cup.labels[0].index not in CAT_CLASSES
    assert [x.score for x in chelsea.labels] == sorted((x.score for x in chelsea.labels), reverse=True)
    # The same photo as raw pixels, one image per request: the same top class.
    raw = common.Image(
        raw=common.RawImage(height=cat.shape[0], width=cat.shape[1], channels=3, data=cat.tobytes())
    )
    alone = stub.Classify(ic.ClassifyImageRequest(model=EFFNET, images=[raw], top_k=1)).results[0]
    assert alone.labels[0].index == chelsea.labels[0].index
