"""Checks on the values the v2 faces read from request parameters and JSON inputs
(``sampling_parameters`` of the text face, ``parameters`` of the image face), shared so both
refuse the same way."""

from __future__ import annotations

import json
from collections.abc import Sequence

from taskserve.server.errors import InvalidInput


def json_object(text: str, name: str, keys: Sequence[str], max_chars: int) -> dict[str, object]:
    """``text`` as a JSON object of at most ``max_chars`` characters whose keys are all in ``keys``."""
    if len(text) > max_chars:
        raise InvalidInput(f"{name} has {len(text)} characters, over the limit of {max_chars}")
    try:
        value = json.loads(text)
    except ValueError as err:
        raise InvalidInput(f"{name} is not valid JSON ({str(err)[:120]})") from None
    if not isinstance(value, dict):
        raise InvalidInput(f"{name} must be a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        shown = [k[:40] for k in unknown[:8]]
        raise InvalidInput(f"{name} has unknown keys {shown}; the keys served are {list(keys)}")
    return value


def integer(label: str, value: object) -> int:
    """``value`` as an int (a JSON bool is not one); ``label`` names it in the refusal."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{label} must be an integer, got {str(value)[:40]!r}")
    return value
