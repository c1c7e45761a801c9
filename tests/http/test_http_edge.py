"""The HTTP door's edge, with real clients: bearer tokens (the OpenAI SDK's api_key) checked
before the body is read, health public unless --auth-health, the body cap (413) before the
body is read, TLS and mutual TLS from the gRPC door's certificate flags, no CORS."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.certs import Pki, make_test_pki
from tests.support.server import ServerThread, running_server

TOKENS = ("first-token-0123456789", "second-token-abcdefghij")
CAP = 64 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("http-pki"))


@pytest.fixture(scope="module")
def guarded(tiny_repository: Path) -> Iterator[ServerThread]:
    with running_server(tiny_repository, http_port=0, auth_tokens=TOKENS, max_http_body_bytes=CAP) as s:
        yield s


def _port(server: ServerThread) -> int:
    assert server.app is not None
    return server.app.http_port


def _raw(port: int, head: bytes) -> bytes:
    """Send only a request head (no body) and read the answer: a server that waited for the
    declared body would time out here instead of answering."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            part = sock.recv(65536)
            if not part:
                break
            data += part
        return data


def test_the_openai_sdk_api_key_is_the_bearer_token(guarded: ServerThread) -> None:
    base = f"http://127.0.0.1:{_port(guarded)}/v1"
    for token in TOKENS:
        with openai.OpenAI(base_url=base, api_key=token, max_retries=0) as client:
            assert [m.id for m in client.models.list()] == ["simple"]
    with openai.OpenAI(base_url=base, api_key="wrong-token", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as refused:
            client.models.list()
    assert refused.value.status_code == 401
    assert refused.value.body["type"] == "authentication_error"  # type: ignore[index]
    assert "Bearer" in refused.value.body["message"]  # type: ignore[index]
    assert refused.value.response.headers["www-authenticate"] == "Bearer"


def test_tokens_are_checked_before_the_body_is_read(guarded: ServerThread) -> None:
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    assert _raw(_port(guarded), head).startswith(b"HTTP/1.1 401")


def test_health_is_public_unless_auth_health(guarded: ServerThread, tiny_repository: Path) -> None:
    base = f"http://127.0.0.1:{_port(guarded)}"
    assert httpx.get(f"{base}/health").status_code == 200
    assert httpx.get(f"{base}/v1/models").status_code == 401
    with running_server(tiny_repository, http_port=0, auth_tokens=TOKENS, auth_health=True) as strict:
        url = f"http://127.0.0.1:{_port(strict)}/health"
        assert httpx.get(url).status_code == 401
        assert httpx.get(url, headers={"authorization": f"Bearer {TOKENS[1]}"}).status_code == 200


def test_a_body_over_the_cap_is_refused_before_it_is_read(guarded: ServerThread) -> None:
    head = (
        b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKENS[0].encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: " + str(CAP + 1).encode() + b"\r\n\r\n"
    )
    answer = _raw(_port(guarded), head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"--max-http-body-mb" in answer or b"content-length" in answer.lower()


def test_a_chunked_body_over_the_cap_gets_413_with_the_openai_body(guarded: ServerThread) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(CAP // 1024 + 2):
            yield b" " * 1024

    reply = httpx.post(
        f"http://127.0.0.1:{_port(guarded)}/v1/embeddings", content=chunks(),
        headers={"authorization": f"Bearer {TOKENS[0]}", "content-type": "application/json"},
    )  # fmt: skip
    assert reply.status_code == 413
    assert reply.json()["error"]["code"] == "body_too_large"
    assert str(CAP) in reply.json()["error"]["message"]


def test_no_cors_headers_are_sent(guarded: ServerThread) -> None:
    reply = httpx.options(
        f"http://127.0.0.1:{_port(guarded)}/v1/models",
        headers={"origin": "https://evil.example", "access-control-request-method": "GET",
                 "authorization": f"Bearer {TOKENS[0]}"},
    )  # fmt: skip
    assert not [h for h in reply.headers if h.lower().startswith("access-control-")]


def test_tls_and_mutual_tls_use_the_grpc_certificate_flags(tiny_repository: Path, pki: Pki) -> None:
    with running_server(tiny_repository, http_port=0, tls_cert=pki.server_cert, tls_key=pki.server_key) as tls:
        url = f"https://localhost:{_port(tls)}/v1/models"
        trusted = ssl.create_default_context(cafile=str(pki.ca))
        assert httpx.get(url, verify=trusted).json()["data"][0]["id"] == "simple"
        with openai.OpenAI(
            base_url=f"https://localhost:{_port(tls)}/v1", api_key="x", max_retries=0,
            http_client=httpx.Client(verify=trusted),
        ) as client:  # fmt: skip
            assert [m.id for m in client.models.list()] == ["simple"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(url)  # the test CA is not in the system's trust store
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.get(url.replace("https://", "http://"))  # plaintext to a TLS port
    with running_server(
        tiny_repository, http_port=0, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca
    ) as mtls:
        url = f"https://localhost:{_port(mtls)}/v1/models"
        with_cert = ssl.create_default_context(cafile=str(pki.ca))
        with_cert.load_cert_chain(str(pki.client_cert), str(pki.client_key))
        assert httpx.get(url, verify=with_cert).status_code == 200
        stranger = ssl.create_default_context(cafile=str(pki.ca))
        stranger.load_cert_chain(str(pki.stranger_cert), str(pki.stranger_key))
        for context in (ssl.create_default_context(cafile=str(pki.ca)), stranger):
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                httpx.get(url, verify=context)


def test_a_saturated_server_answers_429_as_the_grpc_door_answers_resource_exhausted(tiny_repository: Path) -> None:
    with running_server(tiny_repository, http_port=0, max_concurrent_requests=0) as server:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{_port(server)}/v1", api_key="x", max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as refused:
                client.embeddings.create(model="simple", input="some text")
    assert refused.value.status_code == 429
    assert refused.value.body["code"] == "queue_full"  # type: ignore[index]
    assert "retry with backoff" in refused.value.body["message"]  # type: ignore[index]
