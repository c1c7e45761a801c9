"""The generation engine as tasks see it: hand it a sequence, iterate its tokens.

A model version with a ``generation:`` block is served by a ``GenerationEngine``
(``LoadedModel.engine``) instead of a request ``Scheduler`` (``LoadedModel.scheduler``);
both share the ``Lifecycle`` the model manager drives. A task asks its model for the
one it needs and never inspects a scheduler's type.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from taskserve.server.runtimes.sampling import TokenSampler
from taskserve.server.scheduling.base import Lifecycle


@dataclass(frozen=True)
class SequenceRequest:
    """What the task hands the engine for one generation."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    # Picks the next token where the logits are: on the runner's thread, inside
    # ``DecoderRunner.sample``. Owned by this sequence alone (it holds its seeded generator).
    sampler: TokenSampler
    # Tokens after which the sequence ends (end of sequence); the token itself is delivered.
    stop_token_ids: frozenset[int] = frozenset()
    # Absolute time.monotonic().
    deadline: float | None = None
    # Encoder-decoder runners only: the encoder's states for the source (see StepRow.encoder_states).
    encoder_states: np.ndarray | None = None


class TokenStream(Protocol):
    """One sequence's tokens. Iterating ends after the last token (or raises why the
    sequence failed); ``cancel`` ends the sequence and frees its cache slot at once.
    Leaving the iteration early cancels too."""

    def __aiter__(self) -> AsyncIterator[int]: ...

    def cancel(self) -> None: ...


class GenerationEngine(Lifecycle):
    """Continuous batching of sequences over a resident KV cache. ``generate`` and the
    streams' ``cancel`` are called on the event loop that ran ``start``."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int:
        """Cache positions one sequence may use: prompt plus generated tokens (minus one)."""

    @abc.abstractmethod
    def generate(self, request: SequenceRequest) -> TokenStream:
        """Queue a sequence. Raises InvalidInput for a request it can never run and
        ModelNotReady once stopping."""
