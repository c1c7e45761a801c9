"""KServe v2 REST through tritonclient.http, unchanged, on the demo's real MiniLM and
EfficientNet-Lite0: JSON tensors and the binary tensor data extension give the gRPC door's
numbers; errors are KServe's {"error": ...} with the gRPC door's words; the repository
extension obeys --model-control-mode."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tcgrpc
import tritonclient.http as tchttp
from tritonclient.utils import InferenceServerException

from taskserve.exporters.demo import ENTRY_NAMES
from tests.support.server import ServerThread, running_server

MINILM = ENTRY_NAMES["minilm"]
EFFNET = ENTRY_NAMES["efficientnet-lite0"]


@pytest.fixture(scope="module")
def server(demo_repository: Path) -> Iterator[ServerThread]:
    with running_server(demo_repository, http_port=0) as s:
        yield s


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    assert server.app is not None
    return f"127.0.0.1:{server.app.http_port}"


@pytest.fixture(scope="module")
def http_client(base: str) -> Iterator[Any]:
    client = tchttp.InferenceServerClient(base, network_timeout=120)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc_client(server: ServerThread) -> Iterator[Any]:
    with tcgrpc.InferenceServerClient(server.address) as client:
        yield client


def _minilm_tensors() -> dict[str, np.ndarray]:
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2204, 2851, 2000, 102]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}


def _inputs(module: Any, tensors: dict[str, np.ndarray], binary: bool | None = None) -> list[Any]:
    inputs = []
    for name, array in tensors.items():
        tensor = module.InferInput(name, list(array.shape), "INT64" if array.dtype == np.int64 else "FP32")
        if binary is None:
            tensor.set_data_from_numpy(array)
        else:
            tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def _declared(grpc_client: Any, model: str) -> dict[str, np.ndarray]:
    """The model's inputs filled for one request (names from its metadata)."""
    names = [t.name for t in grpc_client.get_model_metadata(model).inputs]
    tensors = _minilm_tensors()
    return {name: tensors[name] for name in names}


def test_server_and_model_endpoints(http_client: Any, grpc_client: Any) -> None:
    assert http_client.is_server_live() and http_client.is_server_ready()
    assert http_client.get_server_metadata()["name"] == "taskserve"
    assert http_client.is_model_ready(MINILM) and http_client.is_model_ready(MINILM, "1")
    assert not http_client.is_model_ready("no-such-model")
    meta = http_client.get_model_metadata(MINILM)
    grpc_meta = grpc_client.get_model_metadata(MINILM)
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        (t.name, t.datatype, list(t.shape)) for t in grpc_meta.inputs
    ]
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    config = http_client.get_model_config(EFFNET)
    assert config["name"] == EFFNET and int(config["max_batch_size"]) > 0
    assert [i["name"] for i in config["input"]] == [i.name for i in grpc_client.get_model_config(EFFNET).config.input]


@pytest.mark.parametrize("binary", [False, True])
def test_minilm_json_and_binary_equal_grpc(http_client: Any, grpc_client: Any, binary: bool) -> None:
    tensors = _declared(grpc_client, MINILM)
    expected = grpc_client.infer(MINILM, _inputs(tcgrpc, tensors)).as_numpy("sentence_embedding")
    outputs = [tchttp.InferRequestedOutput("sentence_embedding", binary_data=binary)]
    result = http_client.infer(MINILM, _inputs(tchttp, tensors, binary), outputs=outputs, request_id="a1")
    got = result.as_numpy("sentence_embedding")
    assert got.dtype == np.float32 and got.shape == (2, 384)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert result.get_response()["id"] == "a1"
    assert [o["name"] for o in result.get_response()["outputs"]] == ["sentence_embedding"]


def test_effnet_binary_by_default_and_json_equal_grpc(http_client: Any, grpc_client: Any) -> None:
    meta = grpc_client.get_model_metadata(EFFNET)
    name, output = meta.inputs[0].name, meta.outputs[0].name
    image = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
    expected = grpc_client.infer(EFFNET, _inputs(tcgrpc, {name: image})).as_numpy(output)
    # No outputs named: tritonclient asks for all of them as binary (binary_data_output).
    binary = http_client.infer(EFFNET, _inputs(tchttp, {name: image}, binary=True))
    np.testing.assert_allclose(binary.as_numpy(output), expected, rtol=1e-5, atol=1e-5)
    as_json = http_client.infer(
        EFFNET, _inputs(tchttp, {name: image}, binary=False), outputs=[tchttp.InferRequestedOutput(output, False)]
    )
    np.testing.assert_allclose(as_json.as_numpy(output), expected, rtol=1e-5, atol=1e-5)


def test_errors_are_kserve_bodies_with_the_grpc_words(http_client: Any, grpc_client: Any, base: str) -> None:
    tensors = _declared(grpc_client, MINILM)
    wrong = {k: v.astype(np.float32) for k, v in tensors.items()}
    with pytest.raises(InferenceServerException) as grpc_err:
        grpc_client.infer(MINILM, _inputs(tcgrpc, wrong))
    with pytest.raises(InferenceServerException) as http_err:
        http_client.infer(MINILM, _inputs(tchttp, wrong))
    assert http_err.value.message() == grpc_err.value.message()
    assert "expected datatype INT64" in http_err.value.message()

    missing = httpx.post(f"http://{base}/v2/models/no-such-model/infer", json={"inputs": []}, timeout=10)
    assert missing.status_code == 404
    assert set(missing.json()) == {"error"} and "no-such-model" in missing.json()["error"]
    broken = httpx.post(f"http://{base}/v2/models/{MINILM}/infer", content=b"{not json", timeout=10)
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    short = httpx.post(
        f"http://{base}/v2/models/{MINILM}/infer",
        content=b'{"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, 2], '
        b'"parameters": {"binary_data_size": 16}}]}',
        headers={"Inference-Header-Content-Length": "1000"},
        timeout=10,
    )
    assert short.status_code == 400 and "Inference-Header-Content-Length" in short.json()["error"]
    for response in (missing, broken, short):
        assert "Traceback" not in response.text and "/tmp" not in response.text and "/src/" not in response.text


def test_repository_index_and_refused_model_control(http_client: Any, base: str) -> None:
    index = {m["name"]: m["state"] for m in http_client.get_model_repository_index()}
    assert index[MINILM] == "READY" and index[EFFNET] == "READY"
    with pytest.raises(InferenceServerException) as err:
        http_client.unload_model(MINILM)
    assert "--model-control-mode explicit" in err.value.message()
    load = httpx.post(f"http://{base}/v2/repository/models/{MINILM}/load", timeout=10)
    assert load.status_code == 400 and "--model-control-mode" in load.json()["error"]
    assert http_client.is_model_ready(MINILM)  # nothing was unloaded


def test_explicit_model_control_unloads_and_loads_over_rest(tiny_repository: Path) -> None:
    with running_server(tiny_repository, http_port=0, model_control_mode="explicit") as s:
        assert s.app is not None
        client = tchttp.InferenceServerClient(f"127.0.0.1:{s.app.http_port}")
        try:
            client.unload_model("simple")
            assert not client.is_model_ready("simple")
            client.load_model("simple")
            assert client.is_model_ready("simple")
            with pytest.raises(InferenceServerException) as err:
                client.load_model("../outside")
            assert "Traceback" not in err.value.message()
        finally:
            client.close()
