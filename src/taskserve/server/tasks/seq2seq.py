"""The transform tasks on an encoder-decoder model (task ``text2text-generation``: T5,
BART, Marian families exported by ``taskserve-export hf DIR --task text2text-generation``).

The export is two repository entries: the encoder (``<name>-encoder``, task ``tensor``:
``input_ids``, ``attention_mask`` -> ``last_hidden_state``) and this entry, optimum's
merged decoder (``use_cache_branch`` false on the first step, which also computes the
cross-attention keys/values; true afterwards, when the cache holds them), served by the
generation engine (the entry's ``generation:`` block; ``server/runtimes/seq2seq_runner.py``).
The encoder runs once per request through the encoder entry's batcher; its states go to
the engine with the sequence (the decoder start token as the prompt), and every running
sequence's next decoder step shares the engine's iterations. Tokens are picked here (the
engine calls this request's ``TokenPicker``), turned into text with stop strings, and a
consumer that stops early cancels the sequence, freeing its slot at the next iteration.

task_options: ``encoder_model`` (the encoder entry's name), ``decoder_start_token_id``,
``eos_token_id`` (both also read from ``generation_config.json``), ``max_new_tokens``
(default 256), ``max_new_tokens_limit`` (4096, lowered to the positions the model has),
``max_concurrent_generations`` (64), ``languages``, ``prompt_templates`` (default
``{text}`` for every kind: e.g. ``translation: "translate {source} to {target}: {text}"``
for T5), plus the tokenizer's keys.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
from pydantic import Field

from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.scheduling.engine_api import SequenceRequest
from taskserve.server.tasks.base import CallOptions, ServedModel, TaskConfigError, TaskContext, batcher_of
from taskserve.server.tasks.decoding import TextStream, TokenPicker
from taskserve.server.tasks.generation_options import GenerationOptions
from taskserve.server.tasks.text import TextTask
from taskserve.server.tasks.text_generation import (
    GenerateParams,
    GenerationChunk,
    TokenChunks,
    check_decoding,
    generation_slot,
)
from taskserve.server.tasks.transform import PromptTemplates, TransformInput, TransformKind


class Seq2SeqOptions(GenerationOptions):
    encoder_model: str | None = Field(None, description="the encoder entry's name (default NAME-encoder)")
    decoder_start_token_id: int | None = Field(
        None, description="the decoder's first token (default: generation_config's)"
    )


class Seq2SeqGenerator(TextTask):
    task = "text2text-generation"
    options: Seq2SeqOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        name = model.name
        inputs = {t.name: t for t in model.config.inputs or ()}
        needed = {"input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}
        engine = model.engine
        if not needed <= set(inputs) or engine is None:
            raise TaskConfigError(
                f"model {name!r} is not an encoder-decoder's merged decoder served by the generation engine "
                f"(inputs {sorted(needed)} and a generation: block in config.yaml); export it with "
                "taskserve-export hf DIR --task text2text-generation"
            )
        self.engine = engine
        self.encoder_model = self.options.encoder_model or f"{name}-encoder"
        generation = self._generation_config()
        start = self.options.decoder_start_token_id
        if start is None:
            configured = generation.get("decoder_start_token_id")
            start = configured if isinstance(configured, int) else None
        if start is None:
            raise TaskConfigError(f"model {name!r}: set task_options.decoder_start_token_id")
        self.decoder_start = start
        eos: object = self.options.eos_token_id
        if eos is None:
            eos = generation.get("eos_token_id")
        listed: list[object] = [eos] if not isinstance(eos, list) else eos
        listed += self.options.eos_token_ids or []
        self.eos_ids = frozenset(e for e in listed if isinstance(e, int))
        self.max_positions = self.tokenizer.max_length
        self.default_max_new_tokens = self.options.max_new_tokens
        # The decoder's cache holds the start token plus every generated token but the last.
        room = min(self.max_positions - 1, self.engine.max_model_len)
        self.max_new_tokens_limit = min(self.options.max_new_tokens_limit, room)
        self.max_concurrent = self.options.max_concurrent_generations
        self.active = 0
        plain = dict.fromkeys(TransformKind, "{text}")
        self.templates = PromptTemplates(self.options.prompt_templates, name, plain)
        self.languages = frozenset(self.options.languages) if self.options.languages else None

    def _generation_config(self) -> dict[str, object]:
        path = resolve_inside(self.model.model_dir, self.options.generation_config, "task_options.generation_config")
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}

    def check_params(self, params: GenerateParams) -> None:
        check_decoding(params, self.max_new_tokens_limit, self.model.name)

    def prepare(self, text: str) -> list[int]:
        """Blocking: tokenize the encoder's input (too long for the model: INVALID_ARGUMENT)."""
        ids = list(self.tokenizer.encode([text], False, "text")[0].ids)
        if not ids:
            raise InvalidInput("text tokenized to nothing; send some text")
        return ids

    async def transform(
        self, request: TransformInput, params: GenerateParams, options: CallOptions, encoder: ServedModel
    ) -> AsyncIterator[GenerationChunk]:
        """Stream the output text; cancelling the consumer ends the loop at the step in flight."""
        text = self.templates.render(request, self.languages, self.context.limits)
        self.check_params(params)
        steps = self._generate(text, params, options, encoder)
        try:
            with generation_slot(self):
                async for chunk in steps:
                    yield chunk
        finally:
            await steps.aclose()

    async def _generate(
        self, text: str, params: GenerateParams, options: CallOptions, encoder: ServedModel
    ) -> AsyncGenerator[GenerationChunk, None]:
        ids = await self.offload("preprocess", self.prepare, text)
        mask = np.ones((1, len(ids)), dtype=np.int64)
        encoded = await batcher_of(encoder).submit(
            InferRequest(
                inputs={"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": mask},
                output_names=("last_hidden_state",), priority=options.priority, deadline=options.deadline,
            )
        )  # fmt: skip
        hidden = encoded.outputs["last_hidden_state"]
        if hidden.ndim != 3 or hidden.shape[:2] != (1, len(ids)):
            raise RuntimeFailure(
                f"encoder {encoder.name!r} returned last_hidden_state of shape {list(hidden.shape)}, "
                f"expected [1, {len(ids)}, hidden size]"
            )
        limit = params.max_new_tokens or min(self.default_max_new_tokens, self.max_new_tokens_limit)
        picker = TokenPicker(params.sampling, [self.decoder_start])  # penalties see the decoder's tokens
        stream = TextStream(
            lambda t: self.tokenizer.decode(t, skip_special_tokens=True), [self.decoder_start], params.stop
        )
        sequence = self.engine.generate(
            SequenceRequest(
                prompt=(self.decoder_start,),
                max_new_tokens=limit,
                sampler=picker,
                stop_token_ids=self.eos_ids,
                deadline=options.deadline,
                encoder_states=hidden[0],
            )
        )
        chunks = TokenChunks(stream, self.eos_ids, limit, len(ids))
        try:
            async for chunk in chunks.of(sequence):
                yield chunk
        finally:
            sequence.cancel()  # a stop string or a client gone: the slot frees at the next iteration
