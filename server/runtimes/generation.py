"""The seam between the generation engine and the runtimes that execute its steps.

The engine (``server/scheduling/generation_scheduler.py``) owns sequences and decides
what runs each iteration; a ``DecoderRunner`` owns the model and the KV cache, which
stays resident in per-slot buffers between steps (the runner never hands the cache
back). The engine turns no tokens into text and the runner picks no tokens: it
returns logits, and the task's ``TokenPicker`` chooses.

This is also the seam for encoder-decoder models (T5, BART, Marian): such a runner
runs the encoder once on a sequence's first step (``StepRow.encoder_ids``), keeps the
cross-attention keys/values in the slot next to the self-attention cache, and
then decodes exactly like a decoder-only runner. The CPU decoder-only runner is
``server/runtimes/onnx_decoder.py``; a GPU runner keeps the same interface with
device-resident buffers.

Slots: integers in ``[0, max_slots)`` handed out by the engine; a slot holds one
sequence's cache from its first step until ``release``. Positions: a slot's cache
holds positions ``[0, start)`` when a row with ``start`` arrives; the row's tokens
take positions ``start ... start + len(tokens) - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class StepRow:
    """One sequence's part of a step: new tokens for one slot.

    A decode row has one token; a prefill row a chunk of the prompt (the engine
    bounds chunks by its token budget). ``start`` is the number of positions the
    slot already holds; ``start == 0`` is the sequence's first step, where the
    runner resets the slot.
    """

    slot: int
    # int64, shape (n,), n >= 1.
    tokens: np.ndarray
    start: int
    # Encoder-decoder runners only, on a sequence's first step (start == 0): the
    # source token ids the encoder runs on once. Decoder-only runners refuse it.
    encoder_ids: np.ndarray | None = None


class DecoderRunner(Protocol):
    """Executes steps over resident per-slot KV caches. Called from one engine thread:
    never concurrently, so implementations need no locks."""

    @property
    def max_slots(self) -> int:
        """Sequences whose caches can be resident at once (the engine's max_num_seqs at most)."""
        ...

    @property
    def max_model_len(self) -> int:
        """Positions one slot holds: prompt plus generated tokens."""
        ...

    @property
    def vocab_size(self) -> int: ...

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        """Run every row and return float32 logits of shape ``(len(rows), vocab_size)``:
        row i's logits for the position after its last new token. Each slot's cache
        then holds ``start + len(tokens)`` positions. Rows name distinct slots.

        The runner chooses how to execute (all decode rows as one batched model call,
        prefill chunks as their own calls); it copies only the new tokens' keys and
        values into the cache. Raises RuntimeFailure when the model fails.
        """
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence left; its cache may be reused by the next ``start == 0`` row."""
        ...

    def close(self) -> None:
        """Free the model and the buffers. Idempotent."""
        ...

    @property
    def cache_bytes(self) -> int:
        """Bytes reserved for the KV cache (all slots), for the occupancy gauge."""
        ...
