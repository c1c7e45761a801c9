"""Errors an export reports to its user: a message that says what to do, no traceback."""

from __future__ import annotations


class ExportError(Exception):
    """A failed export. The CLI prints the message and exits with ``exit_code``."""

    exit_code = 1


class UsageError(ExportError):
    """Bad arguments: unknown task, missing directory, unwritable output."""

    exit_code = 2


class ValidationFailed(ExportError):
    """The exported graph does not reproduce the source model; the message holds the table."""

    exit_code = 3


class TensorRTUnavailable(ExportError):
    """``--tensorrt`` was asked for on a machine without NVIDIA TensorRT."""

    exit_code = 4
