"""Sentence embeddings: texts -> vectors, and cosine similarity between texts.

task_options: ``embedding_output`` (default "sentence_embedding" when the model has it, else
"last_hidden_state"), ``pooled_in_graph`` (true: the output already holds one vector
per text), ``pooling`` ("mean" | "cls" | "max" | "none"; default "none" for a pooled
output, "mean" for token states), ``normalize`` (default true; false cannot undo a
normalization inside the graph), ``truncation``, plus the tokenizer's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.errors import InvalidInput
from taskserve.server.tasks.base import CallOptions, TaskConfigError, check_texts
from taskserve.server.tasks.text import TextOptions, TextTask
from taskserve.server.tasks.tokenization import TokenBatch

POOLINGS = ("mean", "cls", "max", "none")


@dataclass(frozen=True)
class EmbedParams:
    # None: task_options.normalize (default true).
    normalize: bool | None = None
    truncate: bool | None = None


def pool(states: np.ndarray, mask: np.ndarray, method: str) -> np.ndarray:
    """Token states (rows, tokens, dim) to one vector per row, ignoring padding."""
    if method == "cls":
        first: np.ndarray = states[:, 0]
        return first
    weights = mask[:, : states.shape[1], None].astype(np.float32)
    if method == "max":
        peak: np.ndarray = np.where(weights > 0, states, -np.inf).max(axis=1)
        return peak
    summed = (states * weights).sum(axis=1)
    out: np.ndarray = summed / np.clip(weights.sum(axis=1), 1e-9, None)
    return out


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    out: np.ndarray = vectors / np.clip(norms, 1e-12, None)
    return out


class SentenceEmbeddingOptions(TextOptions):
    pooling: str | None = Field(
        None,
        description="mean, cls, max or none (default: none for a sentence_embedding output, else mean); with "
        "pooled_in_graph, what the graph does (e.g. cls+max)",
    )
    normalize: bool = Field(True, description="L2-normalize embeddings when a request does not say")
    pooled_in_graph: bool = Field(False, description="the graph pools itself: its output is the embedding")
    embedding_output: str | None = Field(
        None, description="the output read (default sentence_embedding when present, else last_hidden_state)"
    )


class SentenceEmbedder(TextTask):
    task = "sentence-embedding"
    options: SentenceEmbeddingOptions

    def _output_and_pooling(self) -> tuple[str, str]:
        names = self.output_names()
        pooled = "sentence_embedding"
        default = pooled if names is None or pooled in names else "last_hidden_state"
        output = self.output_name(default, self.options.embedding_output, "embedding_output")
        if self.options.pooled_in_graph:
            # task_options.pooling then only describes what the graph does.
            return output, "none"
        pooling = self.options.pooling or ("none" if output == pooled else "mean")
        if pooling not in POOLINGS:
            raise TaskConfigError(
                f"model {self.model.name!r}: task_options.pooling {pooling!r} is not one of {POOLINGS}"
            )
        return output, pooling

    async def embed(
        self, texts: Sequence[str], params: EmbedParams, options: CallOptions, what: str = "texts"
    ) -> np.ndarray:
        """One float32 vector per text, (rows, dim)."""
        return (await self.embed_counted(texts, params, options, what))[0]

    async def embed_counted(
        self, texts: Sequence[str], params: EmbedParams, options: CallOptions, what: str = "texts"
    ) -> tuple[np.ndarray, int]:
        """``embed``, and how many tokens the texts became (special tokens included, padding not):
        the usage OpenAI's embeddings API reports."""
        check_texts(what, texts, self.limits)
        batch = await self.tokenize(texts, self.truncate(params.truncate), what)
        normalize = params.normalize if params.normalize is not None else self.options.normalize
        return await self._vectors(batch, normalize, options), int(batch.arrays["attention_mask"].sum())

    async def _vectors(self, batch: TokenBatch, normalize: bool, options: CallOptions) -> np.ndarray:
        output, pooling = self._output_and_pooling()
        per_token = [output] if pooling != "none" else []
        states = (await self.run_model(batch, options, [output], per_token))[output].astype(np.float32)

        def postprocess() -> np.ndarray:
            vectors = pool(states, batch.arrays["attention_mask"], pooling) if pooling != "none" else states
            if vectors.ndim != 2:
                raise TaskConfigError(
                    f"model {self.model.name!r}: output {output!r} has shape {states.shape}; set task_options.pooling "
                    "to pool token states into one vector per text"
                )
            return l2_normalize(vectors) if normalize else vectors

        return await self.offload("postprocess", postprocess)

    async def compare(
        self, source: str, candidates: Sequence[str], truncate: bool | None, options: CallOptions
    ) -> np.ndarray:
        """Cosine similarity of ``source`` to each candidate, (candidates,)."""
        if not source.strip():
            raise InvalidInput("source is empty; send the text to compare the candidates with")
        if len(source) > self.limits.max_text_chars:
            raise InvalidInput(
                f"source has {len(source)} characters, over the limit of {self.limits.max_text_chars}"
            )
        check_texts("candidates", candidates, self.limits)
        cut = self.truncate(truncate)

        def encode() -> TokenBatch:
            encodings = self.tokenizer.encode([source], cut, "source") + self.tokenizer.encode(
                candidates, cut, "candidates"
            )
            return self.batch(encodings)

        batch = await self.offload("preprocess", encode)
        vectors = await self._vectors(batch, True, options)
        scores: np.ndarray = np.clip(vectors[1:] @ vectors[0], -1.0, 1.0)
        return scores
