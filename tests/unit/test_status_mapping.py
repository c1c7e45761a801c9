"""Every server error maps to its gRPC status in one place; unknown errors become INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from taskserve.server import errors
from taskserve.server.frontends.grpc.status import describe


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound, grpc.StatusCode.NOT_FOUND),
        (errors.WrongTask, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.ModelNotReady, grpc.StatusCode.UNAVAILABLE),
        (errors.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled, grpc.StatusCode.CANCELLED),
        (errors.Unsupported, grpc.StatusCode.UNIMPLEMENTED),
        (errors.RuntimeFailure, grpc.StatusCode.INTERNAL),
        (errors.ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_known_errors_keep_their_message(error: type[errors.TaskServeError], status: grpc.StatusCode) -> None:
    assert describe(error("what went wrong and how to fix it")) == (status, "what went wrong and how to fix it")


def test_every_code_has_a_grpc_status() -> None:
    for code in errors.Code:
        assert getattr(grpc.StatusCode, code.value)


def test_unknown_errors_are_internal_and_hide_details(caplog: pytest.LogCaptureFixture) -> None:
    status, message = describe(KeyError("secret internals"))
    assert status == grpc.StatusCode.INTERNAL
    assert "secret internals" not in message
    assert "server log" in message
    assert "secret internals" in caplog.text
