"""Silence library chatter (tracer warnings, optimum/transformers info logs) during a step."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

_LOGGERS = ("optimum", "transformers", "torch.onnx", "onnxruntime", "root", "sentence_transformers")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    saved = {name: logging.getLogger(name).level for name in _LOGGERS}
    try:
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
