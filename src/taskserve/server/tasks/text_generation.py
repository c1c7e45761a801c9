"""Text generation: a prompt (or chat messages) -> text streamed token by token.

Every decoder runs on the generation engine (entries with a ``generation:`` block,
exported by ``taskserve-export``): the task hands the engine (``scheduling/engine_api.py``)
a sequence with its ``TokenPicker``; the engine batches every running sequence's next token
into one model call over a resident KV cache and streams the tokens back. An entry without
a ``generation:`` block (an old export whose graph takes the whole ``past_key_values`` on
every step) is refused when its config is read (``repository/config.py``), with the command
that re-exports it.

The task owns what is about text: the chat template, the detokenizer that
never splits a character, stop strings (held back until they resolve), the end of
sequence, sampling settings, the concurrency cap. Tokenizing the prompt and rendering
the chat template run on the worker pool.

task_options: ``max_length`` (positions the model handles: prompt plus generated
tokens), ``max_new_tokens`` (default per request, 256), ``max_new_tokens_limit``
(largest a request may ask for, 4096), ``max_concurrent_generations`` (64: each
holds its KV cache in memory; beyond it RESOURCE_EXHAUSTED at once), ``eos_token_ids`` (also read from
``generation_config.json``), ``chat_template`` (file name; default
``chat_template.jinja`` or ``tokenizer_config.json``'s), plus the tokenizer's keys.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from taskserve.server.errors import GenerationCapExceeded, InvalidInput, Overloaded
from taskserve.server.repository.paths import resolve_inside, shown
from taskserve.server.scheduling.engine_api import SequenceRequest
from taskserve.server.tasks.base import CallOptions, ServedModel, TaskConfigError, TaskContext, engine_of
from taskserve.server.tasks.chat_template import ChatMessage, ChatTemplate, read_chat_template, special_token
from taskserve.server.tasks.decoding import Sampling, TextStream, TokenPicker
from taskserve.server.tasks.generation_options import TextGenerationOptions
from taskserve.server.tasks.text import TextTask

# Stop strings per request, and characters per stop string.
MAX_STOPS = 16
# The roles chat templates know; anything else is refused before the template runs.
CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_CHARS = 256
# Beyond it a penalty only erases the seen tokens; a typo (100 for 1.00) is refused instead.
MAX_REPETITION_PENALTY = 10.0


class FinishReason(enum.Enum):
    # max_new_tokens generated.
    LENGTH = "length"
    # A stop string was generated (it is not part of the text).
    STOP = "stop"
    # The model generated an end-of-sequence token.
    EOS = "eos"


@dataclass(frozen=True)
class GenerateParams:
    # 0: task_options.max_new_tokens (default 256), lowered to the positions the prompt leaves.
    max_new_tokens: int = 0
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class GenerationChunk:
    """Text generated since the previous chunk and the token ids that produced it.

    A token that ends half-way through a character, or text that may still become a
    stop string, is held until it resolves, so one chunk may carry several ids. The
    last chunk has ``finish_reason`` and ``usage``; its ids include an end-of-sequence
    token or a stop string's tokens, whose text is never sent.
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class _Bounded(Protocol):
    model: ServedModel
    active: int
    max_concurrent: int


@contextmanager
def generation_slot(task: _Bounded) -> Iterator[None]:
    """One of the model's concurrent generations (task_options.max_concurrent_generations),
    held for the body; over the limit: Overloaded. Shared with the encoder-decoder task."""
    if task.active >= task.max_concurrent:
        raise Overloaded(
            f"model {task.model.name!r} is running {task.active} generations, its limit "
            "(task_options.max_concurrent_generations); retry with backoff"
        )
    task.active += 1
    try:
        yield
    finally:
        task.active -= 1


class TokenChunks:
    """Turns generated tokens into chunks: the text as it decodes, the finish reason and
    usage on the last. Shared by the decoder-only and the encoder-decoder generators."""

    def __init__(self, stream: TextStream, eos_ids: frozenset[int], limit: int, prompt_tokens: int) -> None:
        self._stream, self._eos_ids, self._limit, self._prompt_tokens = stream, eos_ids, limit, prompt_tokens
        self._generated = 0
        self._unsent: list[int] = []
        self.finished = False

    def push(self, token: int) -> GenerationChunk | None:
        """The chunk this token completes, if any; ``finished`` once it is the last."""
        self._generated += 1
        self._unsent.append(token)
        finish: FinishReason | None = None
        text = ""
        if token in self._eos_ids:
            finish = FinishReason.EOS
        else:
            text = self._stream.push(token)
            if self._stream.stopped:
                finish = FinishReason.STOP
            elif self._generated >= self._limit:
                finish = FinishReason.LENGTH
        if finish is not None:
            self.finished = True
            return self._last(text + self._stream.finish(), finish)
        if not text:
            return None
        chunk = GenerationChunk(text, tuple(self._unsent))
        self._unsent = []
        return chunk

    def cut(self) -> GenerationChunk:
        """The last chunk when the engine ended the sequence at its cache length."""
        return self._last(self._stream.finish(), FinishReason.LENGTH)

    async def of(self, tokens: AsyncIterable[int]) -> AsyncGenerator[GenerationChunk, None]:
        """The chunks of ``tokens`` until the generation finishes; the caller stops ``tokens``."""
        async for token in tokens:
            chunk = self.push(token)
            if chunk is not None:
                yield chunk
            if self.finished:
                return
        # The engine ended the sequence at its cache length (the limit keeps within it; kept as a guard).
        yield self.cut()

    def _last(self, text: str, finish: FinishReason) -> GenerationChunk:
        usage = Usage(prompt_tokens=self._prompt_tokens, generated_tokens=self._generated)
        return GenerationChunk(text, tuple(self._unsent), finish, usage)


@dataclass(frozen=True)
class _Prompt:
    ids: list[int]
    max_new_tokens: int



def check_decoding(params: GenerateParams, max_new_tokens_limit: int, model: str) -> None:
    """The decoding settings every generating task refuses before any work: the generation
    cap (its own failure reason), sampling ranges and stop strings."""
    if params.max_new_tokens > max_new_tokens_limit:
        raise GenerationCapExceeded(
            f"max_new_tokens {params.max_new_tokens} is over the limit of {max_new_tokens_limit} "
            f"for model {model!r}; ask for fewer (or raise task_options.max_new_tokens_limit)"
        )
    s = params.sampling
    if not (s.temperature >= 0 and np.isfinite(s.temperature)):
        raise InvalidInput(f"temperature must be >= 0 (0: greedy), got {s.temperature}")
    if not 0 < s.top_p <= 1:
        raise InvalidInput(f"top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < 0:
        raise InvalidInput(f"top_k must be >= 0 (0: no limit), got {s.top_k}")
    if not 0 < s.repetition_penalty <= MAX_REPETITION_PENALTY:
        raise InvalidInput(
            f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY}] (1: none), got {s.repetition_penalty}"
        )
    for name, value in (("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)):
        if not -2 <= value <= 2:
            raise InvalidInput(f"{name} must be in [-2, 2] (0: none), got {value}")
    if len(params.stop) > MAX_STOPS:
        raise InvalidInput(f"stop holds {len(params.stop)} strings, over the limit of {MAX_STOPS}")
    for i, stop in enumerate(params.stop):
        if not stop:
            raise InvalidInput(f"stop[{i}] is empty; every stop string needs some text")
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidInput(f"stop[{i}] has {len(stop)} characters, over the limit of {MAX_STOP_CHARS}")

class TextGenerator(TextTask):
    task = "text-generation"
    options: TextGenerationOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        inputs = {t.name: t for t in model.config.inputs or ()}
        if "input_ids" not in inputs:
            raise TaskConfigError(f"model {model.name!r} has no input_ids input; export it for text-generation")
        # The engine runs every decoder (config.yaml without a generation: block is refused before load).
        self.engine = engine_of(model)
        self.max_positions = min(self.tokenizer.max_length, self.engine.max_model_len)
        self.default_max_new_tokens = self.options.max_new_tokens
        self.max_new_tokens_limit = self.options.max_new_tokens_limit
        self.max_concurrent = self.options.max_concurrent_generations
        # Generations running now; touched on the event loop only.
        self.active = 0
        self.eos_ids = self._eos_ids()
        source = read_chat_template(model.model_dir, self.tokenizer.hf_config, model.name)
        configured = self.options.chat_template
        if configured is not None:
            path = resolve_inside(model.model_dir, configured, "task_options.chat_template")
            if not path.is_file():
                shown_path = shown(path, model.model_dir)
                raise TaskConfigError(f"model {model.name!r}: chat template file {shown_path} is missing")
            source = path.read_text(encoding="utf-8")
        self.chat_template = ChatTemplate(source, self.tokenizer.hf_config, model.name) if source else None

    # -- model facts, read once ------------------------------------------------------

    def _eos_ids(self) -> frozenset[int]:
        found: set[int] = set()
        values: list[object] = [self.options.eos_token_ids, self.options.eos_token_id]
        path = resolve_inside(self.model.model_dir, self.options.generation_config, "task_options.generation_config")
        if path.is_file():
            values.append(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
        for value in values:
            for token in value if isinstance(value, list) else [value]:
                if isinstance(token, int) and not isinstance(token, bool):
                    found.add(token)
        eos = special_token(self.tokenizer.hf_config, "eos_token")
        if not found and eos and (token_id := self.tokenizer.token_to_id(eos)) is not None:
            found.add(token_id)
        return frozenset(found)

    # -- checks and prompt ---------------------------------------------------------------

    def check_params(self, prompt: str, messages: Sequence[ChatMessage], params: GenerateParams) -> None:
        """Everything that can be refused before tokenizing."""
        limits = self.limits
        if prompt and messages:
            raise InvalidInput("send either prompt or messages, not both")
        if messages:
            if self.chat_template is None:
                raise InvalidInput(
                    f"model {self.model.name!r} has no chat template; send the text to continue as prompt instead"
                )
            if len(messages) > limits.max_items:
                raise InvalidInput(f"messages: {len(messages)} exceed the limit of {limits.max_items}")
            for i, m in enumerate(messages):
                if m.role not in CHAT_ROLES:
                    raise InvalidInput(
                        f"messages[{i}].role {m.role[:40]!r} is not a chat role; use one of {list(CHAT_ROLES)}"
                    )
            chars = sum(len(m.content) for m in messages)
            if chars > limits.max_text_chars:
                raise InvalidInput(f"messages hold {chars} characters, over the limit of {limits.max_text_chars}")
        else:
            if not prompt.strip():
                raise InvalidInput("prompt is empty; send the text to continue (or chat messages)")
            if len(prompt) > limits.max_text_chars:
                raise InvalidInput(
                    f"prompt has {len(prompt)} characters, over the limit of {limits.max_text_chars}"
                )
        check_decoding(params, self.max_new_tokens_limit, self.model.name)

    def prepare(self, prompt: str, messages: Sequence[ChatMessage], requested: int) -> _Prompt:
        """Blocking: render, tokenize and fit the prompt and the tokens to generate into the model's positions."""
        if messages:
            assert self.chat_template is not None
            # The template writes the special tokens itself.
            ids = self.tokenizer.encode_ids(self.chat_template.render(messages), add_special_tokens=False)
            what = "the chat messages"
        else:
            ids = self.tokenizer.encode_ids(prompt)
            what = "prompt"
        if not ids:
            raise InvalidInput(f"{what} tokenized to nothing; send some text")
        room = self.max_positions - len(ids)
        if room < 1:
            raise InvalidInput(
                f"{what} is {len(ids)} tokens long; model {self.model.name!r} handles {self.max_positions} "
                "positions (prompt plus generated tokens); shorten it"
            )
        if requested > room:
            raise InvalidInput(
                f"{what} is {len(ids)} tokens and max_new_tokens is {requested}, over the {self.max_positions} "
                f"positions model {self.model.name!r} handles; ask for at most {room} new tokens or shorten it"
            )
        return _Prompt(ids, requested or min(self.default_max_new_tokens, room))

    # -- the decode loop -----------------------------------------------------------------

    async def generate(
        self, prompt: str, messages: Sequence[ChatMessage], params: GenerateParams, options: CallOptions
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the continuation. Cancelling the consumer (the client went away, the
        deadline passed) cancels the step in flight and ends the loop."""
        self.check_params(prompt, messages, params)
        steps = self._generate(prompt, messages, params, options)
        try:
            with generation_slot(self):
                first_chunk = options.first_chunk
                async for chunk in steps:
                    if first_chunk is not None:
                        first_chunk()
                        first_chunk = None
                    yield chunk
        finally:
            await steps.aclose()  # a consumer that stopped early ends the loop now, not at garbage collection

    async def _generate(
        self, prompt: str, messages: Sequence[ChatMessage], params: GenerateParams, options: CallOptions
    ) -> AsyncGenerator[GenerationChunk, None]:
        prepared = await self.offload("preprocess", self.prepare, prompt, messages, params.max_new_tokens)
        picker = TokenPicker(params.sampling, prepared.ids)
        stream = TextStream(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), prepared.ids, params.stop)
        tokens = self._engine_tokens(prepared, picker, options)
        chunks = TokenChunks(stream, self.eos_ids, prepared.max_new_tokens, len(prepared.ids))
        try:
            async for chunk in chunks.of(tokens):
                yield chunk
        finally:
            await tokens.aclose()

    async def _engine_tokens(
        self, prepared: _Prompt, picker: TokenPicker, options: CallOptions
    ) -> AsyncGenerator[int, None]:
        request = SequenceRequest(
            prompt=tuple(prepared.ids),
            max_new_tokens=prepared.max_new_tokens,
            sampler=picker,
            stop_token_ids=self.eos_ids,
            deadline=options.deadline,
        )
        sequence = self.engine.generate(request)
        try:
            async for token in sequence:
                yield token
        finally:
            sequence.cancel()  # a stop string or a client gone: the slot frees at the next iteration
