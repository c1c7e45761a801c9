"""The server's error types. Each carries the status it maps to; the gRPC front
end converts them in exactly one place (frontends/grpc/status.py), so nothing
below the front end imports grpc."""

from __future__ import annotations

import enum


class Code(enum.Enum):
    """Status codes, named as gRPC names them (the front end maps by name)."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class TaskServeError(Exception):
    """Base class: a message a person can act on, plus the status it maps to."""

    code: Code = Code.INTERNAL
    # Short machine-readable reason used as a metrics label.
    reason: str = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(TaskServeError):
    code = Code.INVALID_ARGUMENT
    reason = "invalid_input"


class ModelNotFound(TaskServeError):
    code = Code.NOT_FOUND
    reason = "not_found"


class WrongTask(TaskServeError):
    """A typed service was called with a model of another task."""

    code = Code.FAILED_PRECONDITION
    reason = "wrong_task"


class ModelNotReady(TaskServeError):
    code = Code.UNAVAILABLE
    reason = "not_ready"


class Overloaded(TaskServeError):
    code = Code.RESOURCE_EXHAUSTED
    reason = "queue_full"


class DeadlineExceeded(TaskServeError):
    code = Code.DEADLINE_EXCEEDED
    reason = "timeout"


class Cancelled(TaskServeError):
    code = Code.CANCELLED
    reason = "cancelled"


class RuntimeFailure(TaskServeError):
    """The runtime failed while executing; the message is safe to show callers."""

    code = Code.INTERNAL
    reason = "runtime_failure"


class InputRejected(InvalidInput):
    """The runtime refused a request's values (out of the model's domain: a token id
    past the vocabulary, lengths that do not fit). Raised for a whole batch, it sends
    the batch through bisection (scheduling/execution.py) so only the offender fails."""

    reason = "out_of_domain"


class SchedulingFailure(TaskServeError):
    """A bug in the batcher or its executor: INTERNAL, never UNAVAILABLE (which
    clients retry, here into the same bug)."""

    code = Code.INTERNAL
    reason = "internal"


class LimitExceeded(InvalidInput):
    """A request is over a configured size limit (items, characters, pixels, dims);
    the message names the limit and how to raise it."""

    reason = "limit"


class ModelControlDisabled(TaskServeError):
    """Load/unload asked of a server started with --model-control-mode none."""

    code = Code.FAILED_PRECONDITION
    reason = "model_control_disabled"


class ConfigError(TaskServeError):
    """A model's config.yaml is invalid; the message names file, field and fix."""

    code = Code.INVALID_ARGUMENT
    reason = "bad_config"


class GenerationCapExceeded(LimitExceeded):
    """A generation request asks for more new tokens than the model's cap
    (task_options.max_new_tokens_limit); counted under its own failure reason."""

    reason = "generation_cap"
