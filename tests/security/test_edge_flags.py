"""The edge flags of taskserve-server: parsing, token sources, and their refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskserve.server.frontends.grpc.auth import BearerTokenInterceptor, TokenError, load_tokens, parse_tokens
from taskserve.server.main import parse_args
from tests.support.certs import Pki


def test_defaults_are_safe(tmp_path: Path) -> None:
    s = parse_args(["--model-repository", str(tmp_path)])
    assert (s.host, s.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert s.model_control_mode == "none" and s.auth_tokens == () and s.tls_cert is None
    assert s.drain_delay_s == 5.0
    # Clients that do not read: streams end after 30 s unread, 32 per connection.
    assert (s.stream_write_timeout_s, s.max_streams_per_connection) == (30.0, 32)


def test_tls_and_token_flags(tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# ops team\nalpha-token\n\n  beta-token  \n")
    monkeypatch.setenv("TASKSERVE_AUTH_TOKENS", "gamma-token, alpha-token")
    s = parse_args([
        "--model-repository", str(tmp_path), "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca), "--auth-tokens-file", str(tokens), "--model-control-mode", "explicit",
        "--metrics-host", "0.0.0.0", "--drain-delay", "0.5", "--auth-health",
    ])  # fmt: skip
    assert s.auth_tokens == ("alpha-token", "beta-token", "gamma-token")
    assert "alpha-token" not in repr(s)  # settings may be logged; tokens are not in them
    assert (s.tls_cert, s.tls_key, s.tls_client_ca) == (pki.server_cert, pki.server_key, pki.ca)
    assert (s.model_control_mode, s.metrics_host, s.drain_delay_s, s.auth_health) == ("explicit", "0.0.0.0", 0.5, True)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--tls-cert", "CERT"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "CA"], "needs --tls-cert"),
        (["--tls-cert", "missing.pem", "--tls-key", "missing.key"], "is not a file"),
        (["--auth-tokens-file", "EMPTY"], "holds no token"),
        (["--auth-health"], "--auth-health needs tokens"),
        (["--model-control-mode", "poll"], "invalid choice"),
        (["--drain-delay", "-1"], "--drain-delay must be >= 0"),
        (["--stream-write-timeout", "0"], "--stream-write-timeout must be > 0"),
        (["--max-streams-per-connection", "0"], "--max-streams-per-connection must be >= 1"),
    ],
)
def test_refusals_say_what_to_fix(
    tmp_path: Path, pki: Pki, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    (tmp_path / "empty").write_text("# nothing here\n\n")
    names = {"CERT": str(pki.server_cert), "CA": str(pki.ca), "EMPTY": str(tmp_path / "empty")}
    with pytest.raises(SystemExit):
        parse_args(["--model-repository", str(tmp_path), *[names.get(a, a) for a in extra]])
    assert message in capsys.readouterr().err


def test_token_parsing() -> None:
    assert parse_tokens("a,b\nc", "env", separators="\n,") == ["a", "b", "c"]
    assert load_tokens(None, {}) == ()
    assert load_tokens(None, {"TASKSERVE_AUTH_TOKENS": " x , y ,, "}) == ("x", "y")
    with pytest.raises(TokenError) as err:
        parse_tokens("good\nbad token\n", "file")
    assert "token 2" in str(err.value) and "bad token" not in str(err.value)  # never echo a secret
    with pytest.raises(TokenError):
        BearerTokenInterceptor([])


def test_token_check() -> None:
    check = BearerTokenInterceptor(["s3cret", "other"]).authorized
    assert check([("authorization", "Bearer s3cret")]) and check([("authorization", "bearer other")])
    assert check([("x", "y"), ("authorization", b"Bearer s3cret")])
    for bad in ([], [("authorization", "Bearer ")], [("authorization", "Bearer s3cre")],
                [("authorization", "Token s3cret")], [("authorization", "s3cret")]):  # fmt: skip
        assert not check(bad)


def test_engine_cache_goes_to_the_writable_directory_when_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskserve.server.runtimes.onnx_providers import ENGINE_CACHE_ENV, engine_cache_dir

    model_file = tmp_path / "repo" / "m" / "3" / "model.onnx"
    monkeypatch.delenv(ENGINE_CACHE_ENV, raising=False)
    assert engine_cache_dir(model_file, "m") == model_file.parent / "trt_cache"
    monkeypatch.setenv(ENGINE_CACHE_ENV, "/var/cache/taskserve/engines")
    assert engine_cache_dir(model_file, "m") == Path("/var/cache/taskserve/engines/m/3")  # one folder per model version
