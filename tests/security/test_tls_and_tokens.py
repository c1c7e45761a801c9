"""TLS, mutual TLS and bearer tokens: the real client against the real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from taskserve.clients import ClientOptions, TaskServeClient, TlsConfig, Unauthenticated, Unavailable
from taskserve.clients.channel import create_channel
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from tests.security.conftest import TOKENS
from tests.support.certs import Pki
from tests.support.server import ServerProcess, ServerThread, running_server

X = np.ones((1, 4), np.float32)


def _bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _options(tls: TlsConfig | None = None, token: str | None = None, health_check: bool = True) -> ClientOptions:
    # No retries: a refused handshake must show at once, not after backoff.
    metadata = _bearer(token) if token else ()
    return ClientOptions(tls=tls, metadata=metadata, retry=None, timeout_s=5, health_check=health_check)


def _add(client: TaskServeClient) -> np.ndarray:
    return client.infer("simple", {"INPUT0": X, "INPUT1": X})["OUTPUT0"]


def _health(target: str, options: ClientOptions, service: str = "") -> int:
    with create_channel(target, options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int(stub.Check(request, timeout=5, metadata=options.metadata).status)


@pytest.fixture(scope="module")
def tls_server(small_repository: Path, pki: Pki) -> Iterator[ServerThread]:
    with running_server(
        small_repository, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=TOKENS, health_port=0
    ) as s:
        yield s


def test_tls_with_a_token_serves_the_real_client(tls_server: ServerThread, pki: Pki) -> None:
    tls = TlsConfig.from_files(pki.ca)
    for token in TOKENS:  # every configured token is accepted
        with TaskServeClient(tls_server.address, _options(tls, token)) as client:
            np.testing.assert_array_equal(_add(client), 2 * X)
            assert client.model_metadata("simple").name == "simple"


def test_plaintext_and_the_wrong_ca_are_refused_on_a_tls_port(tls_server: ServerThread, pki: Pki) -> None:
    with TaskServeClient(tls_server.address, _options(token=TOKENS[0])) as plain, pytest.raises(Unavailable):
        plain.server_live()
    wrong_ca = TlsConfig.from_files(pki.other_ca)
    with TaskServeClient(tls_server.address, _options(wrong_ca, TOKENS[0])) as client, pytest.raises(Unavailable):
        client.server_live()


@pytest.mark.parametrize(
    "metadata",
    [(), _bearer("not-a-configured-token"), _bearer(TOKENS[0] + "x"), _bearer(TOKENS[0][:-1]),
     (("authorization", f"Basic {TOKENS[0]}"),), (("authorization", TOKENS[0]),)],
    ids=["none", "unknown", "longer", "prefix", "basic-scheme", "no-scheme"],
)  # fmt: skip
def test_missing_or_wrong_tokens_are_unauthenticated(
    tls_server: ServerThread, pki: Pki, metadata: tuple[tuple[str, str], ...]
) -> None:
    options = ClientOptions(tls=TlsConfig.from_files(pki.ca), metadata=metadata, retry=None, timeout_s=5)
    with TaskServeClient(tls_server.address, options) as client:
        with pytest.raises(Unauthenticated) as err:
            _add(client)
        assert "bearer token" in err.value.message
        with pytest.raises(Unauthenticated):
            client.server_live()
        # A streaming method is refused the same way, before the servicer runs.
        stream = pb_grpc.GRPCInferenceServiceStub(client.channel).ModelStreamInfer(
            iter([pb.ModelInferRequest(model_name="simple")]), timeout=5, metadata=metadata or None
        )
        with pytest.raises(grpc.RpcError) as stream_err:
            list(stream)
        assert stream_err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert tls_server.app is not None
    assert tls_server.app.models.get("simple").metrics is not None  # still serving the others


def test_health_and_reflection_need_no_token(tls_server: ServerThread, pki: Pki) -> None:
    options = _options(TlsConfig.from_files(pki.ca))
    assert _health(tls_server.address, options) == health_pb2.HealthCheckResponse.SERVING
    assert _health(tls_server.address, options, "simple") == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with create_channel(tls_server.address, options) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(iter(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))))
    assert "inference.GRPCInferenceService" in {s.name for s in answer.list_services_response.service}


def test_a_plaintext_health_port_serves_probes_beside_the_tls_port(tls_server: ServerThread) -> None:
    assert tls_server.app is not None and tls_server.app.health_port > 0
    probe = f"127.0.0.1:{tls_server.app.health_port}"
    assert _health(probe, ClientOptions(retry=None, timeout_s=5)) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(probe) as channel:  # health only: nothing else is served there
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_auth_health_protects_health_too(small_repository: Path) -> None:
    with running_server(small_repository, auth_tokens=TOKENS, auth_health=True) as server:
        # The client's own health watch carries no per-call token: off against --auth-health.
        with pytest.raises(grpc.RpcError) as err:
            _health(server.address, _options(health_check=False))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with_token = _options(token=TOKENS[1], health_check=False)
        assert _health(server.address, with_token) == health_pb2.HealthCheckResponse.SERVING
        with TaskServeClient(server.address, with_token) as client:
            np.testing.assert_array_equal(_add(client), 2 * X)


@pytest.fixture(scope="module")
def mtls_server(small_repository: Path, pki: Pki) -> Iterator[ServerThread]:
    with running_server(
        small_repository, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as server:
        yield server


def test_mutual_tls_accepts_a_client_certificate_from_its_ca(mtls_server: ServerThread, pki: Pki) -> None:
    tls = TlsConfig.from_files(pki.ca, pki.client_key, pki.client_cert)
    with TaskServeClient(mtls_server.address, _options(tls)) as client:
        np.testing.assert_array_equal(_add(client), 2 * X)


def test_mutual_tls_refuses_no_certificate_and_a_foreign_one(mtls_server: ServerThread, pki: Pki) -> None:
    for tls in (
        TlsConfig.from_files(pki.ca),  # server-authenticated only
        TlsConfig.from_files(pki.ca, pki.stranger_key, pki.stranger_cert),  # signed by another CA
    ):
        with TaskServeClient(mtls_server.address, _options(tls)) as client, pytest.raises(Unavailable):
            client.server_live()


def test_the_cli_flags_wire_mtls_and_tokens(
    small_repository: Path, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# one per line\nfile-token-123\n")
    monkeypatch.setenv("TASKSERVE_AUTH_TOKENS", "env-token-456")
    server = ServerProcess(
        small_repository, "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), "--auth-tokens-file", str(tokens),
    )  # fmt: skip
    try:
        mtls = TlsConfig.from_files(pki.ca, pki.client_key, pki.client_cert)
        for token in ("file-token-123", "env-token-456"):
            with TaskServeClient(server.address, _options(mtls, token)) as client:
                client.wait_until_ready("simple", timeout=120)
                np.testing.assert_array_equal(_add(client), 2 * X)
        with TaskServeClient(server.address, _options(mtls, "guess")) as client, pytest.raises(Unauthenticated):
            _add(client)
        with TaskServeClient(server.address, _options(TlsConfig.from_files(pki.ca), "file-token-123")) as client:
            with pytest.raises(Unavailable):
                client.server_live()
        assert not any("file-token-123" in line or "env-token-456" in line for line in server.output)
        server.terminate()
        assert server.wait(30) == 0
    finally:
        server.kill()
