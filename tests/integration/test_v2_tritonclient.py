"""The v2 protocol through tritonclient, a real third-party client."""

from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as tpb
from tritonclient.utils import InferenceServerException

from tests.support.server import ServerThread


@pytest.fixture(scope="module")
def client(core_server: ServerThread) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(core_server.address)


def _inputs(dtype: str, a: np.ndarray, b: np.ndarray) -> list[tc.InferInput]:
    inputs = [tc.InferInput("INPUT0", list(a.shape), dtype), tc.InferInput("INPUT1", list(b.shape), dtype)]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def _status(err: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(err.value.status())


def test_liveness_readiness_and_server_metadata(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "taskserve"
    assert "model_repository" in meta.extensions


def test_model_readiness(client: tc.InferenceServerClient) -> None:
    assert client.is_model_ready("simple")
    assert client.is_model_ready("simple", "1")
    assert not client.is_model_ready("broken_config")
    assert not client.is_model_ready("no_such_model")


def test_model_metadata_and_config(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("simple")
    assert meta.name == "simple"
    assert list(meta.versions) == ["1", "2"]
    assert meta.platform == "onnxruntime_onnx"
    assert [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [
        ("INPUT0", "FP32", [-1, 4]),
        ("INPUT1", "FP32", [-1, 4]),
    ]
    config = client.get_model_config("simple").config
    assert config.max_batch_size == 8
    assert [i.name for i in config.input] == ["INPUT0", "INPUT1"]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500


@pytest.mark.parametrize(
    ("model", "dtype", "npdtype"),
    [("simple", "FP32", np.float32), ("simple_int64", "INT64", np.int64), ("simple_fp16", "FP16", np.float16)],
)
def test_infer_raw_contents(client: tc.InferenceServerClient, model: str, dtype: str, npdtype: type) -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(-50, 50, size=(3, 4)).astype(npdtype)
    b = rng.integers(-50, 50, size=(3, 4)).astype(npdtype)
    result = client.infer(model, _inputs(dtype, a, b), request_id="req-7")
    assert result.get_response().id == "req-7"
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    assert result.as_numpy("OUTPUT0").dtype == npdtype


def test_infer_bytes(client: tc.InferenceServerClient) -> None:
    data = np.array([[b"hello", b"with\x00nul"], ["unicode \u00e9\u4e2d".encode(), b""]], dtype=np.object_)
    inp = tc.InferInput("INPUT0", [2, 2], "BYTES")
    inp.set_data_from_numpy(data)
    out = client.infer("strings", [inp]).as_numpy("OUTPUT0")
    assert out.shape == (2, 2)
    assert [bytes(x) for x in out.reshape(-1)] == [bytes(x) for x in data.reshape(-1)]


def test_non_utf8_bytes_are_refused(client: tc.InferenceServerClient) -> None:
    data = np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_)
    inp = tc.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as err:
        client.infer("strings", [inp])
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "element 1 is not valid UTF-8" in err.value.message()


def test_infer_typed_contents(client: tc.InferenceServerClient) -> None:
    """Typed `contents` instead of raw bytes, sent with tritonclient's own protobuf messages."""
    stub = client._client_stub
    req = tpb.ModelInferRequest(model_name="simple")
    for name, values in (("INPUT0", [1.0, 2.0, 3.0, 4.0]), ("INPUT1", [0.5, 0.5, 0.5, 0.5])):
        t = req.inputs.add(name=name, datatype="FP32", shape=[1, 4])
        t.contents.fp32_contents.extend(values)
    resp = stub.ModelInfer(req)
    out = {
        o.name: np.frombuffer(raw, np.float32) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=False)
    }
    np.testing.assert_allclose(out["OUTPUT0"], [1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(out["OUTPUT1"], [0.5, 1.5, 2.5, 3.5])

    req = tpb.ModelInferRequest(model_name="simple_int64")
    for name, values in (("INPUT0", [10, 20, 30, 40]), ("INPUT1", [1, 2, 3, 4])):
        t = req.inputs.add(name=name, datatype="INT64", shape=[1, 4])
        t.contents.int64_contents.extend(values)
    resp = stub.ModelInfer(req)
    assert list(np.frombuffer(resp.raw_output_contents[0], np.int64)) == [11, 22, 33, 44]

    req = tpb.ModelInferRequest(model_name="strings")
    t = req.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, 2])
    t.contents.bytes_contents.extend([b"ab", b"cde"])
    resp = stub.ModelInfer(req)
    raw = resp.raw_output_contents[0]
    assert raw == b"\x02\x00\x00\x00ab\x03\x00\x00\x00cde"


def test_typed_fp16_is_refused_with_a_hint(client: tc.InferenceServerClient) -> None:
    import grpc

    req = tpb.ModelInferRequest(model_name="simple_fp16")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="FP16", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    with pytest.raises(grpc.RpcError) as err:
        client._client_stub.ModelInfer(req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in err.value.details()


def test_requested_output_subset(client: tc.InferenceServerClient) -> None:
    a = np.ones((2, 4), np.float32)
    result = client.infer("simple", _inputs("FP32", a, a), outputs=[tc.InferRequestedOutput("OUTPUT1")])
    assert [o.name for o in result.get_response().outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros((2, 4), np.float32))
    assert result.as_numpy("OUTPUT0") is None


def test_specific_version(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 4), np.float32)
    result = client.infer("simple", _inputs("FP32", a, a), model_version="1")
    assert result.get_response().model_version == "1"
    assert client.infer("simple", _inputs("FP32", a, a)).get_response().model_version == "2"


def test_model_without_batch_dimension(client: tc.InferenceServerClient) -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(client.infer("nobatch", _inputs("FP32", a, a)).as_numpy("OUTPUT0"), 2 * a)


# -- errors ---------------------------------------------------------------------


def test_unknown_model_is_not_found(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 4), np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer("no_such_model", _inputs("FP32", a, a))
    assert _status(err) == "StatusCode.NOT_FOUND"
    assert "simple" in err.value.message()  # lists what exists
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no_such_model")
    assert _status(err) == "StatusCode.NOT_FOUND"


def test_unknown_version_is_not_found(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 4), np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs("FP32", a, a), model_version="9")
    assert _status(err) == "StatusCode.NOT_FOUND"


def test_wrong_shape_datatype_and_length(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 5), np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs("FP32", a, a))
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "expected shape [-1, 4]" in err.value.message() and "[1, 5]" in err.value.message()

    b = np.ones((1, 4), np.float64)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs("FP64", b, b))
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "expected datatype FP32" in err.value.message()

    big = np.ones((9, 4), np.float32)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs("FP32", big, big))
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "max_batch_size" in err.value.message()

    # A raw buffer whose length disagrees with the declared shape.
    req = tpb.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    req.inputs.add(name="INPUT1", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.extend([np.ones(4, np.float32).tobytes(), np.ones(3, np.float32).tobytes()])
    import grpc

    with pytest.raises(grpc.RpcError) as rpc_err:
        client._client_stub.ModelInfer(req)
    assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "12 bytes" in rpc_err.value.details() and "needs 16 bytes" in rpc_err.value.details()


def test_missing_and_unknown_inputs_and_outputs(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 4), np.float32)
    only_one = [tc.InferInput("INPUT0", [1, 4], "FP32")]
    only_one[0].set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", only_one)
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "INPUT1" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple", _inputs("FP32", a, a), outputs=[tc.InferRequestedOutput("NOPE")])
    assert _status(err) == "StatusCode.INVALID_ARGUMENT"
    assert "NOPE" in err.value.message()


def test_model_not_ready_is_unavailable(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 2), np.float32)
    inp = tc.InferInput("INPUT0", [1, 2], "FP32")
    inp.set_data_from_numpy(a)
    with pytest.raises(InferenceServerException) as err:
        client.infer("broken_config", [inp])
    assert _status(err) == "StatusCode.UNAVAILABLE"
    assert "preferred_batch_sizes" in err.value.message()


# -- repository -----------------------------------------------------------------


def test_repository_index_reports_failures_with_reasons(client: tc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["simple"].state == "READY"
    assert index["broken_config"].state == "UNAVAILABLE"
    assert "config.yaml" in index["broken_config"].reason
    assert index["broken_graph"].state == "UNAVAILABLE"
    assert "onnxruntime could not load" in index["broken_graph"].reason
    ready_only = {m.name for m in client.get_model_repository_index().models if m.state == "READY"}
    assert {"simple", "strings", "slow"} <= ready_only


def test_unload_and_load(client: tc.InferenceServerClient) -> None:
    a = np.ones((1, 4), np.int64)
    client.unload_model("simple_int64")
    assert not client.is_model_ready("simple_int64")
    with pytest.raises(InferenceServerException) as err:
        client.infer("simple_int64", _inputs("INT64", a, a))
    assert _status(err) in ("StatusCode.NOT_FOUND", "StatusCode.UNAVAILABLE")
    index = {m.name: m.state for m in client.get_model_repository_index().models}
    assert index["simple_int64"] == "UNAVAILABLE"
    client.load_model("simple_int64")
    assert client.is_model_ready("simple_int64")
    np.testing.assert_array_equal(client.infer("simple_int64", _inputs("INT64", a, a)).as_numpy("OUTPUT0"), 2 * a)


def test_loading_a_broken_model_reports_why(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as err:
        client.load_model("broken_graph")
    assert "failed to load" in err.value.message()
    assert client.is_server_live()


def test_statistics_count_requests(client: tc.InferenceServerClient) -> None:
    before = client.get_inference_statistics("simple", "2").model_stats[0]
    a = np.ones((2, 4), np.float32)
    for _ in range(3):
        client.infer("simple", _inputs("FP32", a, a))
    after = client.get_inference_statistics("simple", "2").model_stats[0]
    assert after.inference_stats.success.count == before.inference_stats.success.count + 3
    assert after.inference_count == before.inference_count + 6
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference > 0
    assert sum(b.compute_infer.count for b in after.batch_stats) >= 1
    everything = client.get_inference_statistics().model_stats
    assert {"simple", "strings"} <= {s.name for s in everything}
