"""The blocking client's v2 calls against an in-test grpc.aio server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from taskserve.clients import (
    ClientOptions,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TaskServeClient,
    TaskServeError,
    Unavailable,
    Unimplemented,
)
from tests.clients.client_fakes import Recorder, ServerThread


@pytest.fixture()
def client(fake_server: ServerThread) -> TaskServeClient:
    with TaskServeClient(fake_server.target) as c:
        yield c


def test_infer_round_trips_every_dtype_as_raw_contents(client: TaskServeClient, rec: Recorder) -> None:
    rng = np.random.default_rng(0)
    inputs = {
        "f32": rng.standard_normal((2, 4)).astype(np.float32),
        "f16": rng.standard_normal((3,)).astype(np.float16),
        "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "u8": np.array([[0, 255]], dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "text": np.array([b"hello", "w\u00f6rld", b""], dtype=np.object_),
    }
    out = client.infer("echo", inputs)
    assert set(out) == {f"OUT_{k}" for k in inputs}
    for name, arr in inputs.items():
        got = out[f"OUT_{name}"]
        assert got.shape == arr.shape
        if name == "text":
            assert got.tolist() == [b"hello", "w\u00f6rld".encode(), b""]
        else:
            assert got.dtype == arr.dtype
            np.testing.assert_array_equal(got, arr)
    sent = rec.requests[-1]
    assert len(sent.raw_input_contents) == len(inputs)
    assert all(not t.HasField("contents") for t in sent.inputs)
    assert [t.datatype for t in sent.inputs] == ["FP32", "FP16", "INT64", "UINT8", "BOOL", "BYTES"]


def test_infer_sends_requested_outputs_and_batcher_parameters(client: TaskServeClient, rec: Recorder) -> None:
    out = client.infer(
        "echo",
        {"a": np.ones(2, np.float32), "b": np.zeros(2, np.float32)},
        outputs=["OUT_b"],
        request_id="req-7",
        priority=2,
        queue_timeout_us=1500,
        parameters={"flag": True, "label": "x", "ratio": 0.5, "count": 3},
    )
    assert list(out) == ["OUT_b"]
    sent = rec.requests[-1]
    assert [o.name for o in sent.outputs] == ["OUT_b"]
    assert sent.id == "req-7"
    params = sent.parameters
    assert params["priority"].uint64_param == 2
    assert params["timeout"].int64_param == 1500
    assert params["flag"].bool_param is True
    assert params["label"].string_param == "x"
    assert params["ratio"].double_param == 0.5
    assert params["count"].int64_param == 3


def test_infer_decodes_typed_contents(client: TaskServeClient) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 3
    ids = np.array([[1, -2, 3]], dtype=np.int64)
    out = client.infer("typed-echo", {"x": x, "ids": ids})
    np.testing.assert_array_equal(out["OUT_x"], x)
    np.testing.assert_array_equal(out["OUT_ids"], ids)


def test_health_and_metadata(client: TaskServeClient, fake_server: ServerThread) -> None:
    assert client.server_live() is True
    assert client.server_ready() is True
    assert client.model_ready("echo") is True
    meta = client.server_metadata()
    assert (meta.name, meta.extensions) == ("fake", ("model_repository",))
    model = client.model_metadata("echo")
    assert model.input("x").shape == (-1, 4)
    assert model.outputs[0].datatype == "FP32"
    with pytest.raises(KeyError, match="no input 'y'"):
        model.input("y")
    with pytest.raises(NotFound, match="model 'nope' not found") as info:
        client.model_ready("nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("code", "error"),
    [
        ("INVALID_ARGUMENT", InvalidArgument),
        ("NOT_FOUND", NotFound),
        ("FAILED_PRECONDITION", FailedPrecondition),
        ("RESOURCE_EXHAUSTED", ResourceExhausted),
        ("UNIMPLEMENTED", Unimplemented),
        ("INTERNAL", Internal),
        ("PERMISSION_DENIED", TaskServeError),
    ],
)
def test_status_codes_become_typed_errors(client: TaskServeClient, code: str, error: type[TaskServeError]) -> None:
    with pytest.raises(error) as info:
        client.infer(f"fail-{code}", {"x": np.zeros(1, np.float32)})
    assert type(info.value) is error
    assert info.value.code == grpc.StatusCode[code]
    assert info.value.message == f"failed on purpose with {code}"


def test_deadline_applies_to_every_call(fake_server: ServerThread) -> None:
    client = TaskServeClient(fake_server.target, ClientOptions(timeout_s=0.2))
    with client, pytest.raises(DeadlineExceeded):
        client.infer("slow", {"x": np.zeros(1, np.float32)})
    with TaskServeClient(fake_server.target) as client, pytest.raises(DeadlineExceeded):
        client.infer("slow", {"x": np.zeros(1, np.float32)}, timeout=0.2)


def test_unavailable_is_retried_by_the_channel(fake_server: ServerThread, rec: Recorder) -> None:
    rec.fail_first = 2
    with TaskServeClient(fake_server.target) as client:
        out = client.infer("echo", {"x": np.ones(3, np.float32)})
    np.testing.assert_array_equal(out["OUT_x"], np.ones(3, np.float32))
    assert rec.infer_attempts == 3


def test_without_retries_unavailable_surfaces(fake_server: ServerThread, rec: Recorder) -> None:
    rec.fail_first = 1
    client = TaskServeClient(fake_server.target, ClientOptions(retry=None))
    with client, pytest.raises(Unavailable, match="warming up"):
        client.infer("echo", {"x": np.ones(3, np.float32)})
    assert rec.infer_attempts == 1


def test_metadata_and_compression_options(fake_server: ServerThread, rec: Recorder) -> None:
    opts = ClientOptions(metadata=(("authorization", "Bearer t0k"),), compression="gzip")
    with TaskServeClient(fake_server.target, opts) as client:
        out = client.infer("echo", {"x": np.arange(1000, dtype=np.float32)})
    np.testing.assert_array_equal(out["OUT_x"], np.arange(1000, dtype=np.float32))
    assert rec.metadata[-1]["authorization"] == "Bearer t0k"


def test_wait_until_ready(fake_server: ServerThread, rec: Recorder) -> None:
    with TaskServeClient(fake_server.target) as client:
        client.wait_until_ready(timeout=5)
        client.wait_until_ready("echo", timeout=5)
        rec.ready = False
        with pytest.raises(DeadlineExceeded, match="server not ready"):
            client.wait_until_ready(timeout=0.3)


def test_wait_until_ready_reports_unreachable_server() -> None:
    # Port 1 on localhost: nothing listens there.
    client = TaskServeClient("127.0.0.1:1", ClientOptions(retry=None))
    with client, pytest.raises(DeadlineExceeded, match="last error"):
        client.wait_until_ready(timeout=0.5)


def test_round_robin_spreads_calls_over_replicas() -> None:
    with ServerThread() as a, ServerThread() as b:
        target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with TaskServeClient(target, ClientOptions(wait_for_ready=True)) as client:
            for _ in range(20):
                client.infer("echo", {"x": np.ones(1, np.float32)})
        assert a.rec.infer_attempts > 0 and b.rec.infer_attempts > 0
        assert a.rec.infer_attempts + b.rec.infer_attempts == 20
        before = (a.rec.infer_attempts, b.rec.infer_attempts)
        with TaskServeClient(target, ClientOptions(load_balancing="pick_first")) as client:
            for _ in range(10):
                client.infer("echo", {"x": np.ones(1, np.float32)})
        added = (a.rec.infer_attempts - before[0], b.rec.infer_attempts - before[1])
        assert added in ((10, 0), (0, 10))
