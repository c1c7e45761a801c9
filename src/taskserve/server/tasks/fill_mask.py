"""Fill-mask: texts holding the mask token -> the likeliest tokens for each mask.

task_options: ``output`` (default "logits"), ``mask_token`` and ``mask_token_id``
(default the tokenizer_config's, else "[MASK]" or "<mask>"), ``top_k`` (5), ``truncation``,
plus the tokenizer's keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.errors import InvalidInput
from taskserve.server.tasks.base import (
    CallOptions,
    ServedModel,
    TaskConfigError,
    TaskContext,
    check_texts,
    softmax,
    top_k_indices,
)
from taskserve.server.tasks.text import TextOptions, TextTask
from taskserve.server.tasks.tokenization import TokenBatch

# Texts per model call: the logits of a call hold rows x tokens x vocabulary floats,
# so calls stay small and each is reduced to the mask positions before the next.
_ROWS_PER_CALL = 16


@dataclass(frozen=True)
class FillParams:
    # 0: task_options.top_k, else 5.
    top_k: int = 0
    truncate: bool | None = None


@dataclass(frozen=True)
class Completion:
    token: str
    token_id: int
    score: float
    # The text with this mask replaced by the token (other masks kept).
    sequence: str


@dataclass(frozen=True)
class MaskPrediction:
    # Character offset of the mask token in the text.
    start: int
    completions: tuple[Completion, ...]


class FillMaskOptions(TextOptions):
    top_k: int = Field(5, ge=1, description="tokens per mask when a request does not say")
    mask_token: str | None = Field(
        None, description="the mask token (default: tokenizer_config.json's, else [MASK] or <mask>)"
    )
    mask_token_id: int | None = Field(None, description="its id, checked against the tokenizer")


class MaskFiller(TextTask):
    task = "fill-mask"
    options: FillMaskOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        self.mask_token, self.mask_id = self._find_mask()

    def _find_mask(self) -> tuple[str, int]:
        configured: object = self.options.mask_token or self.tokenizer.hf_config.get("mask_token")
        if isinstance(configured, dict):
            configured = configured.get("content")
        candidates = [configured] if isinstance(configured, str) else ["[MASK]", "<mask>"]
        configured_id = self.options.mask_token_id
        for token in candidates:
            token_id = self.tokenizer.token_to_id(token)
            if token_id is not None:
                if isinstance(configured_id, int) and configured_id != token_id:
                    raise TaskConfigError(
                        f"model {self.model.name!r}: task_options.mask_token_id {configured_id} is not the id of "
                        f"{token!r} ({token_id}) in its tokenizer"
                    )
                return token, token_id
        raise TaskConfigError(
            f"model {self.model.name!r}: its tokenizer has no mask token {candidates}; set task_options.mask_token"
        )

    def _display(self, token_id: int) -> str:
        # A lone subword decodes with its continuation marker; callers want the text.
        return self.tokenizer.decode([token_id]).strip().removeprefix("##")

    def _predict(
        self, text: str, batch: TokenBatch, row: int, logits: np.ndarray, top_k: int
    ) -> tuple[MaskPrediction, ...]:
        encoding = batch.encodings[row]
        positions = [t for t, i in enumerate(encoding.ids) if i == self.mask_id]
        predictions = []
        for t in positions:
            start, end = encoding.offsets[t]
            probs = softmax(logits[t].astype(np.float32))
            completions = []
            for token_id in top_k_indices(probs, top_k):
                token = self._display(int(token_id))
                completions.append(
                    Completion(
                        token, int(token_id), float(probs[token_id]), text[:start] + token + text[end:]
                    )
                )
            predictions.append(MaskPrediction(start, tuple(completions)))
        return tuple(predictions)

    async def fill(
        self, texts: Sequence[str], params: FillParams, options: CallOptions
    ) -> list[tuple[MaskPrediction, ...]]:
        """Per text, one prediction per mask token, in text order."""
        check_texts("texts", texts, self.limits)
        for i, text in enumerate(texts):
            if self.mask_token not in text:
                raise InvalidInput(
                    f"texts[{i}] holds no mask token; put {self.mask_token!r} where a word is missing"
                )
        batch = await self.tokenize(texts, self.truncate(params.truncate))
        for i, enc in enumerate(batch.encodings):
            if self.mask_id not in enc.ids:
                raise InvalidInput(
                    f"texts[{i}]: truncation cut off every mask token; move the mask earlier or shorten the text"
                )
        top_k = params.top_k or self.options.top_k
        output = self.output_name("logits", self.options.output)

        async def group(first: int) -> list[tuple[MaskPrediction, ...]]:
            rows = range(first, min(first + _ROWS_PER_CALL, len(texts)))
            part = TokenBatch(
                encodings=[batch.encodings[r] for r in rows],
                arrays={k: v[rows.start : rows.stop] for k, v in batch.arrays.items()},
            )
            logits = (await self.run_model(part, options, [output], per_token=[output]))[output]

            def postprocess() -> list[tuple[MaskPrediction, ...]]:
                return [self._predict(texts[r], batch, r, logits[r - first], top_k) for r in rows]

            return await self.offload("postprocess", postprocess)

        groups = await asyncio.gather(*(group(i) for i in range(0, len(texts), _ROWS_PER_CALL)))
        return [prediction for part in groups for prediction in part]
