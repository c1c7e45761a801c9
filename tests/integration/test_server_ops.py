"""Health checking, reflection, Prometheus metrics and graceful shutdown."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.support.server import ServerProcess, ServerThread


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_health_overall_and_per_model(core_server: ServerThread) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    assert _health(core_server.address, "") == serving
    assert _health(core_server.address, "simple") == serving
    assert _health(core_server.address, "broken_config") == not_serving
    with pytest.raises(grpc.RpcError) as err:
        _health(core_server.address, "never-heard-of-it")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services(core_server: ServerThread) -> None:
    with grpc.insecure_channel(core_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def _metrics(server: ServerThread) -> str:
    assert server.app is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{server.app.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_move_after_requests(core_server: ServerThread) -> None:
    client = tc.InferenceServerClient(core_server.address)
    before = _metrics(core_server)
    a = np.ones((2, 4), np.float32)
    inputs = [tc.InferInput("INPUT0", [2, 4], "FP32"), tc.InferInput("INPUT1", [2, 4], "FP32")]
    for i in inputs:
        i.set_data_from_numpy(a)
    for _ in range(4):
        client.infer("simple", inputs)
    with pytest.raises(InferenceServerException):
        client.infer("simple", inputs[:1])
    after = _metrics(core_server)
    labels = {"model": "simple", "version": "2"}
    assert (
        _sample(after, "taskserve_request_success_total", **labels)
        == _sample(before, "taskserve_request_success_total", **labels) + 4
    )
    assert _sample(after, "taskserve_request_failure_total", reason="invalid_input", **labels) >= 1
    assert _sample(after, "taskserve_inference_count_total", **labels) >= 8
    assert _sample(after, "taskserve_request_duration_seconds_count", **labels) >= 4
    assert _sample(after, "taskserve_queue_duration_seconds_count", **labels) >= 4
    assert _sample(after, "taskserve_compute_duration_seconds_count", **labels) >= 1
    assert _sample(after, "taskserve_batch_size_count", **labels) >= 1
    assert "taskserve_pending_requests" in after
    assert _sample(after, "taskserve_model_load_duration_seconds", **labels) > 0


def test_sigterm_drains_in_flight_request(core_repository: Path) -> None:
    server = ServerProcess(core_repository)
    try:
        client = tc.InferenceServerClient(server.address)
        deadline = time.monotonic() + 120
        while not client.is_model_ready("slow"):
            assert time.monotonic() < deadline, "slow model never became ready"
            time.sleep(0.2)
        x = np.random.default_rng(0).standard_normal((512, 256)).astype(np.float32)
        inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        results: list[object] = []

        def call() -> None:
            try:
                results.append(client.infer("slow", [inp], client_timeout=60).as_numpy("OUTPUT0"))
            except Exception as err:  # noqa: BLE001 - recorded for the assertion below
                results.append(err)

        # Several requests: one executing and the rest queued behind it, so the window in
        # which SIGTERM lands with work in flight is long even on a loaded machine.
        workers = [threading.Thread(target=call) for _ in range(4)]
        for worker in workers:
            worker.start()
        # SIGTERM once all four reached the server (a later one would be refused: draining)
        # and at least one is still in flight.
        pending = done = 0.0
        while time.monotonic() < deadline and not (pending >= 1 and pending + done >= 4):
            with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            pending = _sample(text, "taskserve_pending_requests", model="slow")
            done = _sample(text, "taskserve_request_success_total", model="slow")
            time.sleep(0.005)
        assert pending >= 1 and pending + done >= 4, f"saw {pending} in flight, {done} done"
        server.terminate()
        for worker in workers:
            worker.join(60)
        assert len(results) == 4
        for out in results:
            assert isinstance(out, np.ndarray) and out.shape == (512, 256), out
        assert server.wait(60) == 0
        log = "".join(server.output)
        assert "draining" in log
    finally:
        server.kill()
