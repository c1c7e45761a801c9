"""The LLM tensor convention over v2 gRPC (frontends/v2/text_generation.py), through
tritonclient.grpc as against Triton's vLLM backend: a tiny Llama on the generation
engine answers ``text_input`` with ``text_output``, whole (ModelInfer) or one response
per chunk (ModelStreamInfer, decoupled), with the typed service's greedy text."""

from __future__ import annotations

import json
import queue
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tchttp
from tritonclient.utils import InferenceServerException

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests.support.server import ServerThread, running_server

MODEL = "tiny-llama"
PROMPT = "Paris is the capital and most populous city of"


@pytest.fixture(scope="module")
def client(task_server: ServerThread) -> Any:
    with tc.InferenceServerClient(task_server.address) as c:
        yield c


def typed_text(channel: grpc.Channel, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """The typed TextGeneration service's greedy text and its number of chunks."""
    stub = tg_grpc.TextGenerationStub(channel)
    request = tg.GenerateRequest(model=common.ModelRef(name=MODEL), prompt=prompt, max_new_tokens=max_new_tokens)
    replies = list(stub.Generate(request, timeout=60))
    return "".join(r.text for r in replies), len(replies)


def convention_inputs(
    prompt: str, sampling: dict[str, Any] | None = None, stream: bool | None = None, exclude: bool | None = None
) -> list[tc.InferInput]:
    inputs = [tc.InferInput("text_input", [1], "BYTES")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    if sampling is not None:
        inputs.append(tc.InferInput("sampling_parameters", [1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
    for name, flag in (("stream", stream), ("exclude_input_in_output", exclude)):
        if flag is not None:
            inputs.append(tc.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([flag], dtype=bool))
    return inputs


def streamed(client: Any, inputs: list[tc.InferInput], **kwargs: Any) -> list[Any]:
    """Every response of one ModelStreamInfer request, up to the one flagged final."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs, request_id="r1", **kwargs)
        responses = []
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                raise error
            responses.append(result)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return responses
    finally:
        client.stop_stream()


def test_metadata_and_config_present_the_convention_not_the_step_graph(client: Any) -> None:
    meta = client.get_model_metadata(MODEL)
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text_input", "BYTES", [1]),
        ("stream", "BOOL", [1]),
        ("sampling_parameters", "BYTES", [1]),
        ("exclude_input_in_output", "BOOL", [1]),
    ]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]
    config = client.get_model_config(MODEL).config
    assert [(i.name, i.optional) for i in config.input] == [
        ("text_input", False),
        ("stream", True),
        ("sampling_parameters", True),
        ("exclude_input_in_output", True),
    ]
    assert [o.name for o in config.output] == ["text_output"]
    assert config.max_batch_size == 0
    assert config.model_transaction_policy.decoupled
    # Every decoder runs on the engine: GPT-2 presents the same convention.
    names = [t.name for t in client.get_model_metadata("tiny-gpt2").inputs]
    assert "text_input" in names and "input_ids" not in names


def test_model_infer_returns_the_typed_services_greedy_text(client: Any, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 12)
    assert expected
    result = client.infer(MODEL, convention_inputs(PROMPT, {"max_tokens": 12, "temperature": 0}, exclude=True))
    assert result.as_numpy("text_output").tolist() == [expected.encode()]
    # Unset, exclude_input_in_output puts the prompt before a whole answer (the vLLM backend's default).
    result = client.infer(MODEL, convention_inputs(PROMPT, {"max_tokens": 12}))
    assert result.as_numpy("text_output")[0].decode() == PROMPT + expected


def test_stream_infer_sends_one_response_per_chunk_and_flags_the_last(client: Any, channel: grpc.Channel) -> None:
    expected, chunks = typed_text(channel, PROMPT, 16)
    responses = streamed(client, convention_inputs(PROMPT, {"max_tokens": 16}, stream=True))
    texts = [r.as_numpy("text_output")[0].decode() for r in responses]
    assert "".join(texts) == expected
    assert len(responses) == chunks > 1
    flags = [r.get_response().parameters["triton_final_response"].bool_param for r in responses]
    assert flags == [False] * (len(flags) - 1) + [True]
    assert {r.get_response().id for r in responses} == {"r1"}


def test_a_stream_carries_more_decoupled_requests_than_its_concurrency(client: Any) -> None:
    """70 streamed requests, one after another, on one ModelStreamInfer stream (64 may be in
    flight at once): each request frees its place once, with its last chunk, so none waits."""
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        for i in range(70):
            client.async_stream_infer(
                MODEL, convention_inputs(f"{PROMPT} {i}", {"max_tokens": 3}, stream=True), request_id=str(i)
            )
            while True:
                result, error = results.get(timeout=30)
                assert error is None, error
                if result.get_response().parameters["triton_final_response"].bool_param:
                    assert result.get_response().id == str(i)
                    break
    finally:
        client.stop_stream()


def test_stream_infer_without_stream_sends_the_whole_text_once(client: Any, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 10)
    responses = streamed(client, convention_inputs(PROMPT, {"max_tokens": 10}, exclude=True))
    assert [r.as_numpy("text_output")[0].decode() for r in responses] == [expected]


def test_an_empty_final_response_when_asked(client: Any, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 8)
    responses = streamed(
        client,
        convention_inputs(PROMPT, {"max_tokens": 8}, stream=True),
        enable_empty_final_response=True,
    )
    assert responses[-1].as_numpy("text_output") is None
    assert "".join(r.as_numpy("text_output")[0].decode() for r in responses[:-1]) == expected
    assert not any(r.get_response().parameters["triton_final_response"].bool_param for r in responses[:-1])


def test_sampling_keys_from_request_parameters(client: Any, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 5)
    result = client.infer(MODEL, convention_inputs(PROMPT, exclude=True), parameters={"max_tokens": 5})
    assert result.as_numpy("text_output")[0].decode() == expected


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"max_tokens": 4, "best_of": 2}, "unknown keys ['best_of']"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": "hot"}, "temperature must be a finite number"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"stop": [1, 2]}, "stop must be a string or a list of strings"),
        ({"repetition_penalty": 0}, "repetition_penalty must be in (0,"),
    ],
)
def test_bad_sampling_parameters_are_refused_with_invalid_argument(
    client: Any, sampling: dict[str, Any], message: str
) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, convention_inputs(PROMPT, sampling))
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert message in err.value.message()


def test_step_graph_inputs_are_refused_naming_the_convention(client: Any) -> None:
    ids = tc.InferInput("input_ids", [1, 3], "INT64")
    ids.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.int64))
    with pytest.raises(InferenceServerException) as err:
        client.infer(MODEL, [ids])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "text_input" in err.value.message()


def test_an_error_in_a_stream_travels_in_band(client: Any) -> None:
    with pytest.raises(InferenceServerException) as err:
        streamed(client, convention_inputs("", {"max_tokens": 4}, stream=True))
    assert "prompt is empty" in err.value.message()


# -- the same convention over KServe v2 REST: infer, generate, generate_stream -----------------


@pytest.fixture(scope="module")
def http_base(task_repository: Path) -> Iterator[str]:
    with running_server(task_repository, http_port=0) as server:
        assert server.app is not None
        yield f"http://127.0.0.1:{server.app.http_port}"


def test_rest_infer_through_tritonclient_http(http_base: str, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 12)
    client = tchttp.InferenceServerClient(http_base.removeprefix("http://"))
    try:
        inputs = [tchttp.InferInput("text_input", [1], "BYTES"), tchttp.InferInput("sampling_parameters", [1], "BYTES")]
        inputs[0].set_data_from_numpy(np.array([PROMPT.encode()], dtype=np.object_))
        inputs[1].set_data_from_numpy(np.array([json.dumps({"max_tokens": 12}).encode()], dtype=np.object_))
        for binary in (False, True):
            outputs = [tchttp.InferRequestedOutput("text_output", binary_data=binary)]
            value = client.infer(MODEL, inputs, outputs=outputs).as_numpy("text_output")[0]
            # tritonclient gives JSON strings as str, binary ones as bytes.
            assert (value.decode() if binary else value) == PROMPT + expected
        meta = client.get_model_metadata(MODEL)
        assert [t["name"] for t in meta["inputs"]][0] == "text_input"
        assert client.get_model_config(MODEL)["model_transaction_policy"] == {"decoupled": True}
    finally:
        client.close()


def test_generate_returns_the_typed_services_greedy_text(http_base: str, channel: grpc.Channel) -> None:
    expected, _ = typed_text(channel, PROMPT, 12)
    body = {"text_input": PROMPT, "parameters": {"max_tokens": 12, "temperature": 0, "exclude_input_in_output": True}}
    response = httpx.post(f"{http_base}/v2/models/{MODEL}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json() == {"model_name": MODEL, "model_version": "1", "text_output": expected}


def test_generate_stream_with_curl_sends_one_event_per_chunk(http_base: str, channel: grpc.Channel) -> None:
    expected, chunks = typed_text(channel, PROMPT, 16)
    body = json.dumps({"text_input": PROMPT, "sampling_parameters": {"max_tokens": 16}})
    done = subprocess.run(
        ["curl", "-sS", "-N", "--max-time", "60", "-X", "POST", "-H", "Content-Type: application/json",
         "-d", body, f"{http_base}/v2/models/{MODEL}/generate_stream"],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip
    events = [json.loads(line.removeprefix("data: ")) for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert len(events) == chunks > 1
    assert "".join(e["text_output"] for e in events) == expected
    assert all(e["model_name"] == MODEL for e in events)


def test_generate_refusals_have_kserve_bodies(http_base: str) -> None:
    bad = httpx.post(
        f"{http_base}/v2/models/{MODEL}/generate_stream",
        json={"text_input": PROMPT, "sampling_parameters": {"max_tokens": 0}},
        timeout=30,
    )
    assert bad.status_code == 400 and bad.json() == {"error": "max_tokens must be at least 1, got 0"}
    other = httpx.post(f"{http_base}/v2/models/tiny-textcls/generate", json={"text_input": "hi"}, timeout=30)
    assert other.status_code == 400 and "does not generate text" in other.json()["error"]
    unknown = httpx.post(f"{http_base}/v2/models/{MODEL}/generate", json={"prompt": "hi"}, timeout=30)
    assert unknown.status_code == 400 and "has no input 'prompt'" in unknown.json()["error"]
