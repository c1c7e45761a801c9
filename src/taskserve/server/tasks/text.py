"""Base of the tasks whose input is text: tokenizer loading and batch encoding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field
from tokenizers import Encoding

from taskserve.server.tasks.base import CallOptions, ServedModel, Task, TaskContext
from taskserve.server.tasks.tokenization import TextTokenizer, TokenBatch, TokenizerOptions


class TextOptions(TokenizerOptions):
    """The keys every text task reads."""

    truncation: bool = Field(
        False, description="cut texts over max_length when a request does not say (default: refuse them)"
    )


class TextTask(Task):
    """A task with a tokenizer. ``load`` reads the tokenizer (blocking)."""

    options: TextOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        self.tokenizer = TextTokenizer(model.model_dir, self.options, model.name)

    def truncate(self, requested: bool | None) -> bool:
        """The request's choice, else task_options.truncation (default: refuse long texts)."""
        return requested if requested is not None else self.options.truncation

    def encode(self, texts: Sequence[str], truncate: bool, what: str = "texts") -> TokenBatch:
        """Blocking: tokenize and pad. Run on the worker pool via ``tokenize``."""
        encodings = self.tokenizer.encode(texts, truncate, what)
        return self.batch(encodings)

    def batch(self, encodings: Sequence[Encoding]) -> TokenBatch:
        names = self.input_names()
        dtypes = {n: self.input_dtype(n) for n in ("input_ids", "attention_mask", "token_type_ids")}
        return self.tokenizer.pad(encodings, names, dtypes)

    async def tokenize(self, texts: Sequence[str], truncate: bool, what: str = "texts") -> TokenBatch:
        return await self.offload("preprocess", self.encode, texts, truncate, what)

    async def run_model(
        self, batch: TokenBatch, options: CallOptions, outputs: Sequence[str], per_token: Sequence[str] = ()
    ) -> dict[str, np.ndarray]:
        """Infer; the ``per_token`` outputs (token axis 1) are cut back to the batch's
        own length, since the batcher may have padded them to a longer batch."""
        result = await self.infer(batch.arrays, options, outputs)
        return {name: arr[:, : batch.length] if name in per_token else arr for name, arr in result.items()}
