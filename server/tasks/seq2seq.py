"""The transform tasks on an encoder-decoder model (task ``text2text-generation``: T5,
BART, Marian families exported by ``taskserve-export hf DIR --task text2text-generation``).

The export is two repository entries: the encoder (``<name>-encoder``, task ``tensor``:
``input_ids``, ``attention_mask`` -> ``last_hidden_state``) and this entry, optimum's
merged decoder (``use_cache_branch`` false on the first step, which also computes the
cross-attention keys/values; true afterwards, when the cache holds them). The encoder
runs once per request; then one decoder step per token, each a request to this model's
scheduler carrying the request's own encoder states and cache.

The decoder loop lives here alone, over the request batcher (each step runs by itself:
the entry has no batch dimension), so it can move onto the generation engine later.

task_options: ``encoder_model`` (the encoder entry's name), ``decoder_start_token_id``,
``eos_token_id`` (both also read from ``generation_config.json``), ``max_new_tokens``
(default 256), ``max_new_tokens_limit`` (4096, lowered to the positions the model has),
``max_concurrent_generations`` (64), ``languages``, ``prompt_templates`` (default
``{text}`` for every kind: e.g. ``translation: "translate {source} to {target}: {text}"``
for T5), plus the tokenizer's keys.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncGenerator, AsyncIterator

import numpy as np
from taskserve.clients.datatypes import numpy_dtype
from taskserve.server.errors import InvalidInput, Overloaded, RuntimeFailure
from taskserve.server.scheduling.base import InferRequest
from taskserve.server.tasks.base import CallOptions, ServedModel, TaskConfigError, TaskContext
from taskserve.server.tasks.decoding import TextStream, TokenPicker
from taskserve.server.tasks.text import TextTask
from taskserve.server.tasks.text_generation import (
    MAX_STOP_CHARS,
    MAX_STOPS,
    FinishReason,
    GenerateParams,
    GenerationChunk,
    Usage,
)
from taskserve.server.tasks.transform import PromptTemplates, TransformInput, TransformKind, read_languages

_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


class Seq2SeqGenerator(TextTask):
    task = "text2text-generation"

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        name = model.name
        inputs = {t.name: t for t in model.config.inputs or ()}
        needed = {"input_ids", "encoder_hidden_states", "encoder_attention_mask", "use_cache_branch"}
        if not needed <= set(inputs) or model.config.max_batch_size != 0:
            raise TaskConfigError(
                f"model {name!r} is not an encoder-decoder's merged decoder without a batch dimension "
                f"(inputs {sorted(needed)}, max_batch_size 0); export it with "
                "taskserve-export hf DIR --task text2text-generation"
            )
        self._past: dict[str, tuple[int, int, np.dtype[np.generic]]] = {}
        for tensor in inputs.values():
            if _PAST.match(tensor.name):
                dims = tensor.dims  # (batch, heads, length, head size): no batch dim in the config
                if len(dims) != 4 or dims[1] < 1 or dims[3] < 1:
                    raise TaskConfigError(f"model {name!r}: input {tensor.name!r} has dims {list(dims)}")
                self._past[tensor.name] = (dims[1], dims[3], np.dtype(numpy_dtype(tensor.datatype)))
        if not self._past:
            raise TaskConfigError(f"model {name!r} has no past_key_values inputs; export it with its cache")
        self._wanted = ("logits", *(self._present(n) for n in self._past))
        self._dtypes = {n: self.input_dtype(n) for n in ("input_ids", "encoder_attention_mask")}
        self._hidden_dtype = self.input_dtype("encoder_hidden_states", np.float32)
        self.encoder_model = self.option("encoder_model", f"{name}-encoder")
        generation = self._generation_config()
        start = self.options.get("decoder_start_token_id", generation.get("decoder_start_token_id"))
        if not isinstance(start, int):
            raise TaskConfigError(f"model {name!r}: set task_options.decoder_start_token_id")
        self.decoder_start = start
        eos = self.options.get("eos_token_id", generation.get("eos_token_id"))
        self.eos_ids = frozenset(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
        self.max_positions = self.tokenizer.max_length
        self.default_max_new_tokens = self.option("max_new_tokens", 256)
        self.max_new_tokens_limit = min(self.option("max_new_tokens_limit", 4096), self.max_positions - 1)
        self.max_concurrent = self.option("max_concurrent_generations", 64)
        self.active = 0
        plain = dict.fromkeys(TransformKind, "{text}")
        self.templates = PromptTemplates(self.options.get("prompt_templates"), name, plain)
        self.languages = read_languages(self.options, name)

    def _generation_config(self) -> dict[str, object]:
        path = self.model.model_dir / str(self.options.get("generation_config", "generation_config.json"))
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _present(past: str) -> str:
        return past.replace("past_key_values.", "present.", 1)

    def check_params(self, params: GenerateParams) -> None:
        if params.max_new_tokens > self.max_new_tokens_limit:
            raise InvalidInput(
                f"max_new_tokens {params.max_new_tokens} is over the limit of {self.max_new_tokens_limit} "
                f"for model {self.model.name!r}; ask for fewer"
            )
        s = params.sampling
        if not (s.temperature >= 0 and np.isfinite(s.temperature)):
            raise InvalidInput(f"temperature must be >= 0 (0: greedy), got {s.temperature}")
        if not 0 < s.top_p <= 1:
            raise InvalidInput(f"top_p must be in (0, 1], got {s.top_p}")
        if len(params.stop) > MAX_STOPS:
            raise InvalidInput(f"stop holds {len(params.stop)} strings, over the limit of {MAX_STOPS}")
        for i, stop in enumerate(params.stop):
            if not stop or len(stop) > MAX_STOP_CHARS:
                raise InvalidInput(f"stop[{i}] must have 1 to {MAX_STOP_CHARS} characters")

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
        if self.active >= self.max_concurrent:
            raise Overloaded(
                f"model {self.model.name!r} is running {self.active} generations, its limit "
                "(task_options.max_concurrent_generations); retry with backoff"
            )
        self.active += 1
        steps = self._generate(text, params, options, encoder)
        try:
            async for chunk in steps:
                yield chunk
        finally:
            self.active -= 1
            await steps.aclose()

    async def _generate(
        self, text: str, params: GenerateParams, options: CallOptions, encoder: ServedModel
    ) -> AsyncGenerator[GenerationChunk, None]:
        ids = await self.offload("preprocess", self.prepare, text)
        mask = np.ones((1, len(ids)), dtype=self._dtypes["encoder_attention_mask"])
        encoded = await encoder.scheduler.submit(
            InferRequest(
                inputs={"input_ids": np.asarray([ids], dtype=np.int64), "attention_mask": mask.astype(np.int64)},
                output_names=("last_hidden_state",), priority=options.priority, deadline=options.deadline,
            )
        )  # fmt: skip
        hidden = encoded.outputs["last_hidden_state"].astype(self._hidden_dtype, copy=False)
        if hidden.ndim != 3 or hidden.shape[:2] != (1, len(ids)):
            raise RuntimeFailure(
                f"encoder {encoder.name!r} returned last_hidden_state of shape {list(hidden.shape)}, "
                f"expected [1, {len(ids)}, hidden size]"
            )
        limit = params.max_new_tokens or min(self.default_max_new_tokens, self.max_new_tokens_limit)
        picker = TokenPicker(params.sampling)
        stream = TextStream(
            lambda t: self.tokenizer.decode(t, skip_special_tokens=True), [self.decoder_start], params.stop
        )
        # The first step (no cache) computes the cross-attention keys/values; the past inputs are placeholders.
        past = {n: np.zeros((1, heads, 0, size), dtype) for n, (heads, size, dtype) in self._past.items()}
        token, first = self.decoder_start, True
        generated: list[int] = []
        unsent: list[int] = []
        while True:
            inputs = {
                "input_ids": np.asarray([[token]], dtype=self._dtypes["input_ids"]),
                "encoder_hidden_states": hidden,
                "encoder_attention_mask": mask,
                "use_cache_branch": np.asarray([not first]),
                **past,
            }
            result = await self.model.scheduler.submit(
                InferRequest(
                    inputs=inputs, output_names=self._wanted, priority=options.priority, deadline=options.deadline
                )
            )
            outputs = result.outputs
            for name in past:
                # The cache branch returns placeholders for the cross-attention states: keep the first step's.
                if first or ".decoder." in name:
                    past[name] = outputs[self._present(name)]
            first = False
            token = picker.pick(outputs["logits"][0, -1])
            generated.append(token)
            unsent.append(token)
            finish: FinishReason | None = None
            piece = ""
            if token in self.eos_ids:
                finish = FinishReason.EOS
            else:
                piece = stream.push(token)
                if stream.stopped:
                    finish = FinishReason.STOP
                elif len(generated) >= limit:
                    finish = FinishReason.LENGTH
            if finish is not None:
                piece += stream.finish()
                yield GenerationChunk(piece, tuple(unsent), finish, Usage(len(ids), len(generated)))
                return
            if piece:
                yield GenerationChunk(piece, tuple(unsent))
                unsent = []
