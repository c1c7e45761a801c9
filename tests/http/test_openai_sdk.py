"""The OpenAI-compatible door driven by the official ``openai`` package, sync and async,
streaming and not, against a real server on 127.0.0.1: chat and completions on the real
SmolLM2-135M-Instruct (greedy text equal to the typed gRPC service's), embeddings (float and
base64, equal to the typed SentenceEmbedding's) and images (PNG, b64_json)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from taskserve.clients import ClientOptions, TaskServeClient
from taskserve.exporters.demo import ENTRY_NAMES
from tests.http.conftest import EMBED_MODEL, IMAGE_MODEL
from tests.support.server import ServerThread, running_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
SMOL = ENTRY_NAMES["smollm2"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The history of the Roman Empire"


@pytest.fixture(scope="module")
def server(openai_repository: Path) -> Iterator[ServerThread]:
    with running_server(openai_repository, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def base_url(server: ServerThread) -> str:
    assert server.app is not None
    return f"http://127.0.0.1:{server.app.http_port}/v1"


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def typed(server: ServerThread) -> Iterator[TaskServeClient]:
    with TaskServeClient(server.address, ClientOptions(timeout_s=120)) as c:
        yield c


def test_models_lists_every_ready_model(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {SMOL, EMBED_MODEL, IMAGE_MODEL} <= ids


def test_chat_greedy_equals_the_typed_grpc_service(client: openai.OpenAI, typed: TaskServeClient) -> None:
    expected = typed.text.generate_text(model=SMOL, messages=QUESTION, max_new_tokens=32)
    reply = client.chat.completions.create(model=SMOL, messages=QUESTION, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == expected.text == "The capital of France is Paris."
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"  # the model's end-of-sequence token
    assert reply.object == "chat.completion" and reply.model == SMOL
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.prompt_tokens
    assert reply.usage.completion_tokens == expected.usage.generated_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streams_the_same_text_with_usage_and_done(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=SMOL, messages=QUESTION, max_completion_tokens=32, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The capital of France is Paris."
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # streamed, not one chunk
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 5


def test_completion_greedy_equals_typed_with_length_and_stop(client: openai.OpenAI, typed: TaskServeClient) -> None:
    expected = typed.text.generate_text(PROMPT, model=SMOL, max_new_tokens=24)
    reply = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24, temperature=0)
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length" and reply.usage is not None
    assert reply.usage.completion_tokens == 24
    # A stop string taken from the greedy text ends it there, without the stop string.
    stop = expected.text.split()[3]
    stopped = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == expected.text[: expected.text.index(stop)]
    streamed = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=24, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected.text


def test_seeded_sampling_repeats_and_the_seed_matters(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str | None:
        reply = client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
        return reply.choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(seed) for seed in (1, 2, 3)}) > 1


def test_async_client_streams_chat_and_completes(base_url: str, typed: TaskServeClient) -> None:
    expected = typed.text.generate_text(PROMPT, model=SMOL, max_new_tokens=16)

    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120) as client:
            stream = await client.chat.completions.create(
                model=SMOL, messages=QUESTION, max_tokens=32, temperature=0, stream=True  # type: ignore[arg-type]
            )
            chat = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            done = await client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=16, temperature=0)
            return chat, done.choices[0].text

    chat, completion = asyncio.run(run())
    assert chat == "The capital of France is Paris."
    assert completion == expected.text


def test_embeddings_float_and_base64_equal_the_typed_service(
    client: openai.OpenAI, typed: TaskServeClient, openai_repository: Path
) -> None:
    texts = ["a first sentence", "and a second, longer one"]
    expected = typed.text.embed(texts, model=EMBED_MODEL)
    floats = client.embeddings.create(model=EMBED_MODEL, input=texts, encoding_format="float")
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), expected, rtol=0, atol=1e-6)
    assert [d.index for d in floats.data] == [0, 1]
    # Usage counts the tokens the texts became: [CLS] and [SEP] around each, no padding.
    tokens = _tokens(openai_repository / EMBED_MODEL / "tokenizer.json", texts)
    assert tokens > 2 * len(texts) and floats.usage.prompt_tokens == floats.usage.total_tokens == tokens
    # The SDK asks for base64 by default and decodes it itself; decode a raw one by hand too.
    default = client.embeddings.create(model=EMBED_MODEL, input=texts[0])
    np.testing.assert_array_equal(np.array(default.data[0].embedding, dtype=np.float32), expected[0])
    raw = client.embeddings.with_raw_response.create(model=EMBED_MODEL, input=texts, encoding_format="base64")
    encoded = raw.http_response.json()["data"][1]["embedding"]
    np.testing.assert_array_equal(np.frombuffer(base64.b64decode(encoded), dtype="<f4"), expected[1])


def _tokens(tokenizer: Path, texts: list[str]) -> int:
    from tokenizers import Tokenizer

    return sum(len(Tokenizer.from_file(str(tokenizer)).encode(t).ids) for t in texts)


def test_images_come_back_as_png_of_the_asked_size(client: openai.OpenAI) -> None:
    reply = client.images.generate(
        model=IMAGE_MODEL, prompt="a red square", size="32x32", n=2, response_format="b64_json",  # type: ignore[arg-type]
        extra_body={"steps": 2, "seed": 5},
    )  # fmt: skip
    assert reply.data is not None and len(reply.data) == 2
    for image in reply.data:
        assert image.b64_json is not None
        decoded = Image.open(io.BytesIO(base64.b64decode(image.b64_json)))
        assert decoded.format == "PNG" and decoded.size == (32, 32)
    again = client.images.generate(
        model=IMAGE_MODEL, prompt="a red square", size="32x32", n=2, extra_body={"steps": 2, "seed": 5},  # type: ignore[arg-type]
    )
    assert again.data is not None and [d.b64_json for d in again.data] == [d.b64_json for d in reply.data]


def test_refusals_carry_openai_error_bodies(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad_n:
        client.chat.completions.create(model=SMOL, messages=QUESTION, n=2)  # type: ignore[arg-type]
    assert bad_n.value.status_code == 400
    assert bad_n.value.body["param"] == "n" and "n=1" in bad_n.value.body["message"]  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert "no-such-model" in missing.value.body["message"]  # type: ignore[index]
    # The typed service's own validation and message: a cap of the model, the same words.
    with pytest.raises(openai.BadRequestError) as cap:
        client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=100_000)
    assert "max_new_tokens 100000 is over the limit" in cap.value.body["message"]  # type: ignore[index]
    # The wrong kind of model for the route.
    with pytest.raises(openai.BadRequestError) as wrong:
        client.embeddings.create(model=SMOL, input="text")
    assert "text-generation" in wrong.value.body["message"]  # type: ignore[index]
    # A refusal of a stream arrives as a status before any event, not as a 200.
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SMOL, messages=[{"role": "wizard", "content": "hi"}], stream=True  # type: ignore[arg-type,list-item]
        )
    with pytest.raises(openai.BadRequestError) as body:
        client.post("/chat/completions", body={"model": SMOL}, cast_to=object)
    assert "messages" in body.value.body["message"]  # type: ignore[index]
    for err in (bad_n, missing, cap, wrong):
        assert "Traceback" not in str(err.value.body) and "/tmp" not in str(err.value.body)


def test_a_client_that_disconnects_stops_its_generation(server: ServerThread, base_url: str) -> None:
    """On the real model 1000 tokens take far longer than reading three events, so the
    disconnect lands mid-generation: the request ends as cancelled and the engine's slot frees."""
    assert server.app is not None
    registry = server.app.metrics.registry
    cancelled = {"model": SMOL, "version": "1", "protocol": "http", "outcome": "cancelled"}
    before = registry.get_sample_value("taskserve_protocol_requests_total", cancelled) or 0.0
    body = {"model": SMOL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = [line for line in _first_lines(response.iter_lines(), 3)]
    assert all(e.startswith("data: {") for e in events)
    running = {"model": SMOL, "version": "1"}
    deadline = time.monotonic() + 60
    while (registry.get_sample_value("taskserve_protocol_requests_total", cancelled) or 0.0) < before + 1 or (
        registry.get_sample_value("taskserve_running_sequences", running) or 0.0
    ) > 0:
        assert time.monotonic() < deadline, "the generation kept running after its client left"
        time.sleep(0.05)


def test_a_client_that_leaves_an_unstreamed_answer_stops_its_generation(server: ServerThread, base_url: str) -> None:
    """Not streamed, the answer is one body at the end: a client that gives up meanwhile
    (here a read timeout, which closes the connection) must not hold the slot until then."""
    assert server.app is not None
    registry = server.app.metrics.registry
    cancelled = {"model": SMOL, "version": "1", "protocol": "http", "outcome": "cancelled"}
    generated = {"model": SMOL, "version": "1"}
    before = registry.get_sample_value("taskserve_protocol_requests_total", cancelled) or 0.0
    tokens_before = registry.get_sample_value("taskserve_generated_tokens_total", generated) or 0.0
    body = {"model": SMOL, "prompt": PROMPT, "max_tokens": 1000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/completions", json=body, timeout=httpx.Timeout(10, read=1.0))
    deadline = time.monotonic() + 60
    while (registry.get_sample_value("taskserve_protocol_requests_total", cancelled) or 0.0) < before + 1 or (
        registry.get_sample_value("taskserve_running_sequences", generated) or 0.0
    ) > 0:
        assert time.monotonic() < deadline, "the generation kept running after its client left"
        time.sleep(0.05)
    tokens = (registry.get_sample_value("taskserve_generated_tokens_total", generated) or 0.0) - tokens_before
    assert tokens < 1000


def _first_lines(lines: Iterator[str], count: int) -> list[str]:
    found: list[str] = []
    for line in lines:
        if line:
            found.append(line)
        if len(found) == count:
            break
    return found


def test_requests_are_counted_by_protocol(server: ServerThread, client: openai.OpenAI, typed: TaskServeClient) -> None:
    assert server.app is not None
    registry = server.app.metrics.registry

    def count(name: str, protocol: str, **labels: str) -> float:
        return registry.get_sample_value(name, {"model": SMOL, "version": "1", "protocol": protocol, **labels}) or 0.0

    http_ok = count("taskserve_protocol_requests_total", "http", outcome="success")
    grpc_ok = count("taskserve_protocol_requests_total", "grpc", outcome="success")
    first_chunks = count("taskserve_protocol_time_to_first_chunk_seconds_count", "http")
    grpc_first_chunks = count("taskserve_protocol_time_to_first_chunk_seconds_count", "grpc")
    total = registry.get_sample_value("taskserve_request_success_total", {"model": SMOL, "version": "1"}) or 0.0
    list(client.completions.create(model=SMOL, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    typed.text.generate_text(PROMPT, model=SMOL, max_new_tokens=4)
    assert count("taskserve_protocol_requests_total", "http", outcome="success") == http_ok + 1
    assert count("taskserve_protocol_requests_total", "grpc", outcome="success") == grpc_ok + 1
    assert count("taskserve_protocol_time_to_first_chunk_seconds_count", "http") == first_chunks + 1
    assert count("taskserve_protocol_time_to_first_chunk_seconds_count", "grpc") == grpc_first_chunks + 1
    # The existing family still counts every door together, with its labels as they were.
    assert registry.get_sample_value("taskserve_request_success_total", {"model": SMOL, "version": "1"}) == total + 2
