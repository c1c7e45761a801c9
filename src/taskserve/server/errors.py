"""The server's error types. Each carries the status it maps to; the gRPC front
end converts them in exactly one place (frontends/grpc/status.py), so nothing
below the front end imports grpc."""

from __future__ import annotations

import enum
import re

# What a caller-visible message may hold (status details, RepositoryIndex reasons): messages
# built from library exceptions (OSError, PIL, onnxruntime, yaml) can carry server paths,
# object addresses and whole tracebacks; ``caller_safe`` strips them and caps the length.
MAX_MESSAGE_CHARS = 2048
# An absolute path of two or more components, not part of a relative one ("1/model.onnx")
# or of a URL.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/<>~-])/(?:[^\s'\"/:,;()<>\[\]{}]+/)+[^\s'\"/:,;()<>\[\]{}]+")
_ADDRESS = re.compile(r"\s+at 0x[0-9A-Fa-f]+|0x[0-9A-Fa-f]{6,}")
_TRACEBACK = "Traceback (most recent call last)"
SERVER_PATH = "<server path>"

# Characters of a caller-supplied string (a model name, version, input name) an error message
# quotes: enough to recognise it, short enough that a hostile one cannot bloat the status
# (gRPC carries the message in a header, capped by the peers' header limits).
QUOTE_CHARS = 64


def quoted(value: str | bytes, limit: int = QUOTE_CHARS) -> str:
    """``value`` for an error message: its repr, cut to ``limit`` characters and its length
    noted when longer. Every message that echoes what a caller sent goes through here."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} {'characters' if isinstance(value, str) else 'bytes'})"


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


def caller_safe(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``message`` as a caller may see it: absolute paths replaced by ``<server path>``,
    memory addresses and tracebacks removed, at most ``limit`` characters (cut with "…").
    Paths inside the model repository should be made relative first (``<model>/<file>``,
    repository/paths.py ``without_server_paths``), which keeps them useful."""
    cut = message.find(_TRACEBACK)
    if cut >= 0:
        message = message[:cut].rstrip() or "(details in the server log)"
    message = _ADDRESS.sub("", message)
    message = _ABSOLUTE_PATH.sub(SERVER_PATH, message)
    if len(message) > limit:
        message = message[: limit - 1] + "…"
    return message


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
