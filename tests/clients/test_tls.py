"""TLS and mutual TLS against an in-test server, with certificates made by the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest

from taskserve.clients import ClientOptions, TaskServeClient, TlsConfig, Unavailable
from tests.clients.client_fakes import ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(cwd: Path, name: str, ext: str) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-subj", f"/CN={name}",
             "-out", f"{name}.csr", cwd=cwd)  # fmt: skip
    (cwd / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext", cwd=cwd)  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "2", "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    _signed(d, "server", "subjectAltName=DNS:localhost,DNS:taskserve.internal,IP:127.0.0.1\n")
    _signed(d, "client", "extendedKeyUsage=clientAuth\n")
    return d


def _server_credentials(certs: Path, require_client_auth: bool) -> grpc.ServerCredentials:
    pair = ((certs / "server.key").read_bytes(), (certs / "server.crt").read_bytes())
    return grpc.ssl_server_credentials(
        [pair], root_certificates=(certs / "ca.crt").read_bytes(), require_client_auth=require_client_auth
    )


def test_tls_with_own_ca_and_name_override(certs: Path) -> None:
    with ServerThread(credentials=_server_credentials(certs, require_client_auth=False)) as server:
        tls = TlsConfig.from_files(certs / "ca.crt", server_name_override="taskserve.internal")
        with TaskServeClient(server.target, ClientOptions(tls=tls)) as client:
            assert client.server_live()
            out = client.infer("echo", {"x": np.arange(3, dtype=np.int64)})
            np.testing.assert_array_equal(out["OUT_x"], [0, 1, 2])
        # A plaintext client cannot talk to a TLS port.
        plain = TaskServeClient(server.target, ClientOptions(retry=None, timeout_s=2))
        with plain, pytest.raises(Unavailable):
            plain.server_live()


def test_mutual_tls_requires_the_client_certificate(certs: Path) -> None:
    with ServerThread(credentials=_server_credentials(certs, require_client_auth=True)) as server:
        mtls = TlsConfig.from_files(certs / "ca.crt", certs / "client.key", certs / "client.crt")
        with TaskServeClient(server.target, ClientOptions(tls=mtls)) as client:
            assert client.server_ready()
        server_only = TlsConfig.from_files(certs / "ca.crt")
        anonymous = TaskServeClient(server.target, ClientOptions(tls=server_only, retry=None, timeout_s=2))
        with anonymous, pytest.raises(Unavailable):
            anonymous.server_ready()
