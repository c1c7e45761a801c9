"""The transform tasks (translation, summarization, text-to-text): one text in, new
text out, streamed as ``GenerationChunk``s like text generation.

Two kinds of model serve them:
- an instruct decoder (task ``text-generation``) whose task_options carry
  ``prompt_templates``: ``PromptTransforms`` writes the request into the template and
  hands it to the model's ``TextGenerator`` (through its chat template when it has one);
- an encoder-decoder (task ``text2text-generation``): ``Seq2SeqGenerator``
  (``server/tasks/seq2seq.py``).

task_options read here (either kind): ``languages`` (list of names or codes the model
accepts as source/target; unset: any non-empty name), and for the decoder kind
``prompt_templates`` (``{translation: "Translate from {source} to {target}: {text}",
summarization: "Summarize: {text}", text2text: "{text}"}``; a kind without a template
is not served by that model).
"""

from __future__ import annotations

import enum
import string
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from taskserve.server.errors import InvalidInput, WrongTask
from taskserve.server.tasks.base import CallOptions, TaskConfigError, TaskLimits
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.text_generation import GenerateParams, GenerationChunk, TextGenerator

# Characters in a language name or code.
MAX_LANGUAGE_CHARS = 64


class TransformKind(enum.Enum):
    TRANSLATION = "translation"
    SUMMARIZATION = "summarization"
    TEXT2TEXT = "text2text"


# The placeholders each kind's template may use.
_FIELDS: dict[TransformKind, frozenset[str]] = {
    TransformKind.TRANSLATION: frozenset({"text", "source", "target"}),
    TransformKind.SUMMARIZATION: frozenset({"text"}),
    TransformKind.TEXT2TEXT: frozenset({"text"}),
}


@dataclass(frozen=True)
class TransformInput:
    kind: TransformKind
    text: str
    # Translation only.
    source_language: str = ""
    target_language: str = ""


def check_input(
    request: TransformInput, languages: frozenset[str] | None, limits: TaskLimits, model: str, needs_source: bool
) -> None:
    """Empty or oversized text, and languages the model does not know: INVALID_ARGUMENT."""
    if not request.text.strip():
        raise InvalidInput("text is empty; send the text to transform")
    if len(request.text) > limits.max_text_chars:
        raise InvalidInput(f"text has {len(request.text)} characters, over the limit of {limits.max_text_chars}")
    if request.kind is not TransformKind.TRANSLATION:
        return
    pairs = [
        ("target_language", request.target_language, True),
        ("source_language", request.source_language, needs_source),
    ]
    for field, value, required in pairs:
        if not value.strip():
            if required:
                raise InvalidInput(f"{field} is empty; name the language (e.g. English)")
            continue
        if len(value) > MAX_LANGUAGE_CHARS:
            raise InvalidInput(f"{field} has {len(value)} characters, over the limit of {MAX_LANGUAGE_CHARS}")
        if languages is not None and value not in languages:
            raise InvalidInput(f"{field} {value!r} is not one model {model!r} knows; use one of {sorted(languages)}")


class PromptTemplates:
    """task_options.prompt_templates, checked: kind -> template with ``{text}`` (and, for
    translation, ``{source}``/``{target}``). ``default`` fills kinds the option leaves out."""

    def __init__(
        self, raw: Mapping[str, str] | None, model: str, default: Mapping[TransformKind, str] | None = None
    ) -> None:
        self.model = model
        self.templates: dict[TransformKind, str] = dict(default or {})
        for key, template in (raw or {}).items():
            try:
                kind = TransformKind(key)
            except ValueError:
                raise TaskConfigError(
                    f"model {model!r}: task_options.prompt_templates has unknown key {key!r}; "
                    f"use {[k.value for k in TransformKind]}"
                ) from None
            try:
                used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
            except ValueError as err:
                raise TaskConfigError(f"model {model!r}: prompt_templates.{key}: {err}") from None
            if not used <= _FIELDS[kind] or "text" not in used:
                raise TaskConfigError(
                    f"model {model!r}: prompt_templates.{key} uses {sorted(used)}; it needs {{text}} and may use "
                    f"only {sorted(_FIELDS[kind])}"
                )
            self.templates[kind] = template

    def render(self, request: TransformInput, languages: frozenset[str] | None, limits: TaskLimits) -> str:
        """The checked request written into its kind's template."""
        template = self.templates.get(request.kind)
        if template is None:
            raise WrongTask(
                f"model {self.model!r} has no prompt template for {request.kind.value}; "
                f"it serves {sorted(k.value for k in self.templates)}"
            )
        check_input(request, languages, limits, self.model, needs_source="{source}" in template)
        return template.format(text=request.text, source=request.source_language, target=request.target_language)


class PromptTransforms:
    """The transform tasks on a decoder's ``TextGenerator``: a template turns the request
    into one user message (or a plain prompt without a chat template). Thin on purpose:
    generation itself (its limits, sampling, stop strings, cancellation) is the generator's."""

    def __init__(self, generator: TextGenerator) -> None:
        self.generator = generator
        name = generator.model.name
        raw = generator.options.prompt_templates
        if not raw:
            raise WrongTask(
                f"model {name!r} is a text-generation model without task_options.prompt_templates; "
                "it serves TextGeneration only"
            )
        self.templates = PromptTemplates(raw, name)
        languages = generator.options.languages
        self.languages = frozenset(languages) if languages else None

    def transform(
        self, request: TransformInput, params: GenerateParams, options: CallOptions
    ) -> AsyncIterator[GenerationChunk]:
        prompt = self.templates.render(request, self.languages, self.generator.context.limits)
        messages: Sequence[ChatMessage] = ()
        if self.generator.chat_template is not None:
            prompt, messages = "", [ChatMessage("user", prompt)]
        return self.generator.generate(prompt, messages, params, options)
