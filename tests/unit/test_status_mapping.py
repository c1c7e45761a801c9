"""Every server error maps to its gRPC status in one place; unknown errors become INTERNAL."""

from __future__ import annotations

import grpc
import pytest

from taskserve.server import errors
from taskserve.server.frontends.grpc.status import describe

# The status each error class promises callers: written out by hand, so a change in errors.py
# that moves a class to another status fails here.
EXPECTED = {
    errors.TaskServeError: grpc.StatusCode.INTERNAL,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.WrongTask: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ModelNotReady: grpc.StatusCode.UNAVAILABLE,
    errors.Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.RuntimeFailure: grpc.StatusCode.INTERNAL,
    errors.InputRejected: grpc.StatusCode.INVALID_ARGUMENT,
    errors.SchedulingFailure: grpc.StatusCode.INTERNAL,
    errors.LimitExceeded: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelControlDisabled: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.GenerationCapExceeded: grpc.StatusCode.INVALID_ARGUMENT,
}


def _all_error_classes() -> set[type[errors.TaskServeError]]:
    found: set[type[errors.TaskServeError]] = set()
    todo: list[type[errors.TaskServeError]] = [errors.TaskServeError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == errors.__name__ and cls not in found:
            found.add(cls)
            todo.extend(cls.__subclasses__())
    return found


def test_the_table_names_every_error_class() -> None:
    # A class added to errors.py without a row here fails: its status is a promise to callers.
    assert _all_error_classes() == set(EXPECTED)


@pytest.mark.parametrize(("error", "status"), sorted(EXPECTED.items(), key=lambda item: item[0].__name__))
def test_every_error_keeps_its_message_and_status(
    error: type[errors.TaskServeError], status: grpc.StatusCode
) -> None:
    assert describe(error("what went wrong and how to fix it")) == (status, "what went wrong and how to fix it")


def test_every_error_class_has_a_metrics_reason() -> None:
    for cls in _all_error_classes():
        assert cls.reason and cls.reason == cls.reason.lower() and " " not in cls.reason, cls


def test_every_code_has_a_grpc_status() -> None:
    for code in errors.Code:
        assert getattr(grpc.StatusCode, code.value)


def test_unknown_errors_are_internal_and_hide_details(caplog: pytest.LogCaptureFixture) -> None:
    status, message = describe(KeyError("secret internals"))
    assert status == grpc.StatusCode.INTERNAL
    assert "secret internals" not in message
    assert "server log" in message
    assert "secret internals" in caplog.text
