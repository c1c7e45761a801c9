"""The one mapping of server errors to HTTP: every status code has a status, known errors keep
their message, anything else is a generic 500 without the exception's text, and the body is
OpenAI's under /v1 and KServe's elsewhere."""

from __future__ import annotations

import json

import pytest

from taskserve.server import errors
from taskserve.server.errors import Code
from taskserve.server.frontends.http.errors import HTTP_STATUS, error_response

CASES = [
    (errors.InvalidInput("bad"), 400, "invalid_request_error"),
    (errors.LimitExceeded("too many"), 400, "invalid_request_error"),
    (errors.WrongTask("other task"), 400, "invalid_request_error"),
    (errors.ModelNotFound("none"), 404, "not_found_error"),
    (errors.Overloaded("full"), 429, "rate_limit_error"),
    (errors.ModelNotReady("loading"), 503, "server_error"),
    (errors.RuntimeFailure("ort failed"), 500, "server_error"),
    (errors.DeadlineExceeded("late"), 504, "server_error"),
]


def test_every_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(Code)


@pytest.mark.parametrize(("err", "status", "kind"), CASES, ids=[type(c[0]).__name__ for c in CASES])
def test_known_errors_keep_their_message_and_reason(err: errors.TaskServeError, status: int, kind: str) -> None:
    response = error_response("/v1/chat/completions", err)
    assert response.status_code == status
    body = json.loads(response.body)
    assert body == {"error": {"message": err.message, "type": kind, "param": None, "code": err.reason}}
    v2 = error_response("/v2/models/m/infer", err)
    assert v2.status_code == status and json.loads(v2.body) == {"error": err.message}


def test_unknown_errors_are_a_generic_500_without_their_text() -> None:
    response = error_response("/v1/embeddings", KeyError("/srv/secret/path.onnx at 0x7f00"))
    assert response.status_code == 500
    text = response.body.decode()
    assert "internal error (KeyError)" in text
    assert "/srv" not in text and "0x7f" not in text
