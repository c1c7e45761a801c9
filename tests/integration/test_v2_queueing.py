"""Queue policy seen through the v2 protocol: timeouts, deadlines, a full queue, streaming."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.support.server import ServerThread


def _slow_input(rows: int = 1024) -> list[tc.InferInput]:
    x = np.random.default_rng(0).standard_normal((rows, 256)).astype(np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _in_background(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as err:  # noqa: BLE001 - inspected by the test
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_pending(client: tc.InferenceServerClient, server: ServerThread, model: str, count: int) -> None:
    assert server.app is not None
    manager = server.app.models
    deadline = time.monotonic() + 30
    while manager.get(model).scheduler.inflight_count() < count:
        assert time.monotonic() < deadline, f"{model} never had {count} requests in flight"
        time.sleep(0.005)


def test_timeout_parameter_expires_in_queue(core_server: ServerThread) -> None:
    client = tc.InferenceServerClient(core_server.address)
    busy, busy_out = _in_background(lambda: client.infer("slow_queue", _slow_input()))
    _wait_pending(client, core_server, "slow_queue", 1)
    with pytest.raises(InferenceServerException) as err:
        # v2 "timeout" parameter, microseconds: far shorter than the running request.
        client.infer("slow_queue", _slow_input(), timeout=1)
    assert str(err.value.status()) == "StatusCode.DEADLINE_EXCEEDED"
    busy.join(60)
    assert "error" not in busy_out


def test_full_queue_is_resource_exhausted(core_server: ServerThread) -> None:
    client = tc.InferenceServerClient(core_server.address)
    # max_queue_size 1: of six simultaneous requests some must be refused at once,
    # and every one that was accepted must still be answered.
    calls = [_in_background(lambda: client.infer("slow_queue", _slow_input())) for _ in range(6)]
    for thread, _ in calls:
        thread.join(120)
    outcomes = [out for _, out in calls]
    refused = [o["error"] for o in outcomes if "error" in o]
    answered = [o["result"] for o in outcomes if "result" in o]
    assert refused and answered
    for err in refused:
        assert isinstance(err, InferenceServerException)
        assert str(err.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue" in err.message()
    for result in answered:
        assert result.as_numpy("OUTPUT0").shape == (1024, 256)


def test_stream_infer_answers_each_request_and_reports_errors_in_band(core_server: ServerThread) -> None:
    client = tc.InferenceServerClient(core_server.address)
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        a = np.arange(8, dtype=np.float32).reshape(2, 4)
        good = [tc.InferInput("INPUT0", [2, 4], "FP32"), tc.InferInput("INPUT1", [2, 4], "FP32")]
        for i in good:
            i.set_data_from_numpy(a)
        client.async_stream_infer("simple", good, request_id="good-1")
        client.async_stream_infer("simple", good[:1], request_id="bad-1")
        client.async_stream_infer("simple", good, request_id="good-2")
        got = [answers.get(timeout=30) for _ in range(3)]
    finally:
        client.stop_stream()
    ok = {r.get_response().id: r.as_numpy("OUTPUT0") for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert set(ok) == {"good-1", "good-2"}
    np.testing.assert_array_equal(ok["good-1"], 2 * a)
    assert len(errors) == 1 and "INPUT1" in str(errors[0])
