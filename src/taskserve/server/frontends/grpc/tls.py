"""Server TLS credentials from PEM files (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``).

With a client CA the server requires and verifies a client certificate (mutual TLS);
without one, clients authenticate the server only.
"""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsFilesError(ValueError):
    """A certificate or key file is missing or unreadable; names the flag and file."""


def _read(flag: str, path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TlsFilesError(f"{flag} {path}: cannot read it ({err.strerror or err})") from None
    if b"-----BEGIN " not in data:
        raise TlsFilesError(f"{flag} {path}: not a PEM file (expected a '-----BEGIN ...' block)")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    pair = (_read("--tls-key", key), _read("--tls-cert", cert))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=_read("--tls-client-ca", client_ca), require_client_auth=True
    )
