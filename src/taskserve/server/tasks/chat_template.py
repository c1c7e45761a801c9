"""Chat templates: a conversation -> the prompt text a chat model was trained on.

A model directory carries its template as Hugging Face saves it: ``chat_template.jinja``,
else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named templates
of which "default" is used). Templates run in jinja2's immutable sandbox, with the
helpers transformers gives them (``raise_exception``, ``strftime_now``, ``tojson``).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from taskserve.server.errors import InvalidInput
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.tasks.base import TaskConfigError

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


def read_chat_template(model_dir: Path, tokenizer_config: Mapping[str, object], model: str) -> str | None:
    """The model's chat template source, or None when it has none."""
    path = resolve_inside(model_dir, TEMPLATE_FILE, "chat template")
    if path.is_file():
        return path.read_text(encoding="utf-8")
    value = tokenizer_config.get("chat_template")
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default")
    if value is None:
        return None
    if not isinstance(value, str):
        raise TaskConfigError(f"model {model!r}: tokenizer_config.json's chat_template is not a template string")
    return value


def special_token(tokenizer_config: Mapping[str, object], key: str) -> str:
    """A special token's text from tokenizer_config.json (a string, or a dict with "content"); "" when unset."""
    value = tokenizer_config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """A compiled template; ``render`` is thread-safe (jinja2 templates are)."""

    def __init__(self, source: str, tokenizer_config: Mapping[str, object], model: str) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        self.model = model
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise TaskConfigError(f"model {model!r}: its chat template does not compile: {err}") from None
        # Templates refer to the tokenizer's special tokens by these names.
        self._specials = {
            key: special_token(tokenizer_config, key) for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }

    def render(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt for the assistant's next reply (``add_generation_prompt``)."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                **self._specials,
            )
        except _TemplateRefusal as err:
            raise InvalidInput(f"messages: the chat template of model {self.model!r} refuses them: {err}") from None
        except TemplateError as err:
            raise InvalidInput(f"messages: the chat template of model {self.model!r} failed on them: {err}") from None


class _TemplateRefusal(Exception):
    """A template's own ``raise_exception`` (e.g. "roles must alternate")."""


def _raise(message: str) -> NoReturn:
    raise _TemplateRefusal(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)
