"""The round_robin client's health watch: servers without grpc.health.v1 (KServe's, MLServer's)
count as serving without an error in the logs; servers with it are still watched."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from taskserve.clients import ClientOptions, TaskServeClient, Unavailable
from taskserve.clients.channel import static_target
from tests.clients.client_fakes import Recorder, Registrar, ServerThread, add_all_fakes


def test_a_server_without_the_health_service_serves_without_an_error_logged(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    with ServerThread() as server:  # the fakes register no health service
        target = static_target([server.target])
        for _ in range(2):  # the second client finds the answer cached: no second note
            with TaskServeClient(target, ClientOptions(retry=None, timeout_s=10)) as client:
                assert [client.server_live() for _ in range(3)] == [True, True, True]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # gRPC core writes its own errors to the process's stderr, past Python's logging:
    # "health checking Watch method returned UNIMPLEMENTED" once per connection.
    assert "UNIMPLEMENTED" not in capfd.readouterr().err
    [note] = [r for r in caplog.records if r.name == "taskserve.clients.health_probe"]
    assert note.levelno == logging.INFO and target in note.getMessage()


def _fakes_with_health(status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> Registrar:
    def register(server: grpc.aio.Server, rec: Recorder) -> None:
        add_all_fakes(server, rec)
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        # Registered from the server's loop: the status is set before the server starts.
        asyncio.get_running_loop().create_task(servicer.set("", status))

    return register


def test_a_server_with_the_health_service_is_still_watched() -> None:
    with ServerThread(_fakes_with_health(health_pb2.HealthCheckResponse.NOT_SERVING)) as server:
        target = static_target([server.target])
        with TaskServeClient(target, ClientOptions(retry=None, timeout_s=10)) as client:
            with pytest.raises(Unavailable):  # its only server says NOT_SERVING
                client.server_live()
        with TaskServeClient(target, ClientOptions(retry=None, timeout_s=10, health_check=False)) as client:
            assert client.server_live() is True
