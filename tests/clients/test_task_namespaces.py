"""client.text and client.vision: requests carry what the caller passed, results decode into dataclasses."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from taskserve.clients import AsyncTaskServeClient, InvalidArgument, TaskServeClient
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2, token_classification_pb2
from tests.clients.client_fakes import Recorder, ServerThread


@pytest.fixture()
def client(fake_server: ServerThread) -> Iterator[TaskServeClient]:
    with TaskServeClient(fake_server.target) as c:
        yield c


@pytest.fixture()
async def aclient(fake_server: ServerThread) -> AsyncIterator[AsyncTaskServeClient]:
    async with AsyncTaskServeClient(fake_server.target) as c:
        yield c


def test_text_classify(client: TaskServeClient, rec: Recorder) -> None:
    results = client.text.classify(
        ["short one", "this text has five words"], model="sst2", version="3", top_k=1, function="sigmoid",
        truncate=True, priority=2, queue_timeout_us=900,
    )  # fmt: skip
    assert [r.top.label for r in results] == ["short", "long"]
    assert [len(r.labels) for r in results] == [1, 1]
    assert results[1].top.index == 1
    sent = rec.requests[-1]
    assert (sent.model.name, sent.model.version) == ("sst2", "3")
    assert (sent.options.priority, sent.options.timeout_us) == (2, 900)
    assert sent.function == text_classification_pb2.SCORE_FUNCTION_SIGMOID
    assert sent.HasField("truncate") and sent.truncate


def test_unset_optionals_stay_unset(client: TaskServeClient, rec: Recorder) -> None:
    client.text.classify(["a"], model="m")
    sent = rec.requests[-1]
    assert not sent.HasField("truncate")
    assert sent.function == text_classification_pb2.SCORE_FUNCTION_UNSPECIFIED
    assert sent.top_k == 0 and sent.options.priority == 0


def test_text_tag(client: TaskServeClient, rec: Recorder) -> None:
    [entities] = client.text.tag(["met Ada and Alan"], model="ner", aggregation="max", ignore_labels=["O", "MISC"])
    assert [(e.text, e.start, e.end, e.label) for e in entities] == [
        ("Ada", 4, 7, "PER"),
        ("Alan", 12, 16, "PER"),
    ]
    sent = rec.requests[-1]
    assert sent.aggregation == token_classification_pb2.AGGREGATION_STRATEGY_MAX
    assert list(sent.ignore_labels) == ["O", "MISC"]


def test_text_embed_and_compare(client: TaskServeClient, rec: Recorder) -> None:
    vectors = client.text.embed(["ab", "a b c"], model="minilm", normalize=False)
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, [[2, 0, 1], [5, 2, 1]])
    sent = rec.requests[-1]
    assert sent.HasField("normalize") and not sent.normalize
    scores = client.text.compare("abc", ["abc", "a", "abcdef"], model="minilm")
    np.testing.assert_allclose(scores, [1.0, 1 / 3, 1 / 4])


def test_text_answer_and_fill_mask(client: TaskServeClient, rec: Recorder) -> None:
    [[span]] = client.text.answer([("where?", "it is in Paris")], model="qa", top_k=2, allow_no_answer=True)
    assert (span.text, span.start, span.end) == ("Paris", 9, 14)
    sent = rec.requests[-1]
    assert (sent.items[0].question, sent.top_k, sent.allow_no_answer) == ("where?", 2, True)
    [[mask]] = client.text.fill_mask(["the capital is [MASK]."], model="bert", top_k=3)
    assert mask.start == 15
    assert mask.completions[0].sequence == "the capital is paris."
    assert rec.requests[-1].top_k == 3


def test_a_bare_string_is_refused(client: TaskServeClient) -> None:
    with pytest.raises(TypeError, match="list of strings"):
        client.text.classify("not a list", model="m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="softmax"):
        client.text.classify(["x"], model="m", function="tanh")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must name a model"):
        client.text.embed(["x"], model="")


def test_server_errors_are_typed_in_namespaces(client: TaskServeClient) -> None:
    with pytest.raises(InvalidArgument, match="texts must not be empty"):
        client.text.embed([], model="m")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_vision_accepts_arrays_pil_bytes_and_paths(client: TaskServeClient, rec: Recorder, tmp_path: Path) -> None:
    bright = np.full((4, 6, 3), 200, dtype=np.uint8)
    dark = np.zeros((5, 5), dtype=np.uint8)
    path = tmp_path / "img.png"
    path.write_bytes(_png(bright))
    results = client.vision.classify([bright, Image.fromarray(dark), _png(dark), path], model="effnet", top_k=1)
    assert [r.top.label for r in results[:2]] == ["bright", "dark"]
    images = rec.requests[-1].images
    assert [i.WhichOneof("source") for i in images] == ["raw", "raw", "encoded", "encoded"]
    assert (images[0].raw.height, images[0].raw.width, images[0].raw.channels) == (4, 6, 3)
    assert images[1].raw.channels == 1
    assert images[3].encoded == path.read_bytes()
    batch = np.stack([bright, bright])
    assert len(client.vision.classify(batch, model="effnet")) == 2


def test_vision_refuses_bad_images(client: TaskServeClient) -> None:
    with pytest.raises(ValueError, match="uint8"):
        client.vision.classify([np.zeros((2, 2, 3), dtype=np.float32)], model="m")  # type: ignore[list-item]
    with pytest.raises(TypeError, match="list of images"):
        client.vision.classify(b"\x89PNG", model="m")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        client.vision.classify([np.zeros((2, 2, 2), dtype=np.uint8)], model="m")


def test_vision_detect_segment_match(client: TaskServeClient, rec: Recorder) -> None:
    img = np.zeros((8, 10, 3), dtype=np.uint8)
    [dets] = client.vision.detect([img], model="ssd", score_threshold=0.3, max_detections=7)
    assert (dets.width, dets.height) == (10, 8)
    assert dets.detections[0].box.x_max == 10 and dets.detections[0].label == "thing"
    sent = rec.requests[-1]
    assert sent.HasField("score_threshold") and not sent.HasField("iou_threshold")
    assert sent.max_detections == 7
    [seg] = client.vision.segment([img], model="seg", min_area=4)
    mask = seg.segments[0].mask()
    assert mask.shape == (8, 10) and mask[:, :5].all() and not mask[:, 5:].any()
    assert seg.segments[0].area == 40
    scores = client.vision.match([img, img], ["a cat", "a dog", "a car"], model="clip")
    assert scores.similarities.shape == (2, 3)
    np.testing.assert_allclose(scores.similarities[1], [0.2, 0.4, 0.6])
    np.testing.assert_allclose(scores.probabilities.sum(axis=1), [1.0, 1.0], rtol=1e-6)


# Async fixtures live on the session loop (pyproject), so the test must run there too.
@pytest.mark.asyncio(loop_scope="session")
async def test_async_namespaces(aclient: AsyncTaskServeClient, rec: Recorder) -> None:
    assert (await aclient.text.classify(["a b c d e"], model="m"))[0].top.label == "long"
    np.testing.assert_array_equal(await aclient.text.embed(["ab"], model="m"), [[2, 0, 1]])
    assert (await aclient.text.compare("ab", ["ab"], model="m")).tolist() == [1.0]
    assert (await aclient.text.tag(["Bob"], model="m"))[0][0].text == "Bob"
    assert (await aclient.text.answer([("q", "x y")], model="m"))[0][0].text == "y"
    assert (await aclient.text.fill_mask(["[MASK]!"], model="m"))[0][0].completions[0].token == "paris"
    img = np.full((2, 3, 3), 255, dtype=np.uint8)
    assert (await aclient.vision.classify([img], model="m", priority=1))[0].top.label == "bright"
    assert rec.requests[-1].options.priority == 1
    assert (await aclient.vision.detect([img], model="m"))[0].width == 3
    assert (await aclient.vision.segment([img], model="m"))[0].height == 2
    assert (await aclient.vision.match([img], ["x"], model="m")).similarities.shape == (1, 1)
