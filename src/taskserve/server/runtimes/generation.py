"""The seam between the generation engine and the runtimes that execute its steps.

The engine (``server/scheduling/generation_scheduler.py``) owns sequences and decides
what runs each iteration; a ``DecoderRunner`` owns the model and the KV cache, which
stays resident in per-slot buffers between steps (the runner never hands the cache
back). The engine turns no tokens into text; the runner samples each sequence's next token
where the logits are, with the sequence's own ``TokenSampler`` (``runtimes/sampling.py``),
and returns token ids.

This is also the seam for encoder-decoder models (T5, BART, Marian): the task runs
the encoder once (through the encoder entry's own batcher) and hands its states with
the sequence; the runner (``server/runtimes/seq2seq_runner.py``) takes them on the
sequence's first step (``StepRow.encoder_states``), keeps the cross-attention
keys/values in the slot next to the self-attention cache, and then decodes like a
decoder-only runner. The CPU decoder-only runner is ``server/runtimes/onnx_decoder.py``;
a GPU runner keeps the same interface with device-resident buffers.

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

from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.runtimes.sampling import TokenSampler, sample_rows


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
    # encoder's output for the source, shape (source length, hidden size), computed
    # once by the task. Decoder-only runners refuse it.
    encoder_states: np.ndarray | None = None


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

    def sample(self, rows: Sequence[StepRow], samplers: Sequence[TokenSampler | None]) -> list[int | None]:
        """Run the step (as ``step``) and sample where the logits are: row i's next token from
        ``samplers[i]`` (None: the row is inside its prompt and picks nothing). What the engine
        calls; logits leave the runner only through ``step``, for callers that ask for them."""
        ...

    def release(self, slot: int) -> None:
        """The slot's sequence left; its cache may be reused by the next ``start == 0`` row."""
        ...

    @property
    def copies_prefixes(self) -> bool:
        """Whether ``copy_prefix`` works: a slot's cache depends on its tokens alone (False for
        encoder-decoders, whose cache depends on the source too). The engine's prefix cache
        runs only where it does."""
        ...

    def copy_prefix(self, src: int, dst: int, positions: int) -> None:
        """Slot ``dst`` now holds positions ``[0, positions)`` of slot ``src`` and nothing
        after (``src == dst``: the slot keeps its first ``positions``; nothing is copied). The
        engine's prefix cache calls it before a step's rows; the next row of ``dst`` starts
        at ``positions``."""
        ...

    def close(self) -> None:
        """Free the model and the buffers. Idempotent."""
        ...

    @property
    def cache_bytes(self) -> int:
        """Bytes reserved for the KV cache (all slots), for the occupancy gauge."""
        ...


class SlotCacheRunner:
    """What the decoder-only runners share: the slot bookkeeping behind the ``DecoderRunner``
    properties, ``release`` and the warm-up. ``_lengths[slot]`` is the positions the slot's
    cache holds; subclasses set the sizes at load and implement ``step``."""

    _slots = 0
    _positions = 0
    _vocab = 0
    _lengths = np.zeros(0, np.int64)

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        raise NotImplementedError

    def sample(self, rows: Sequence[StepRow], samplers: Sequence[TokenSampler | None]) -> list[int | None]:
        """Host logits (the ONNX runner's are on the host already), sampled on this thread."""
        return sample_rows(self.step(rows), samplers)

    @property
    def max_slots(self) -> int:
        return self._slots

    @property
    def max_model_len(self) -> int:
        return self._positions

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def release(self, slot: int) -> None:
        self._lengths[slot] = 0

    @property
    def copies_prefixes(self) -> bool:
        return True

    def copy_prefix(self, src: int, dst: int, positions: int) -> None:
        if not 0 <= positions <= self._positions:
            raise RuntimeFailure(f"a prefix of {positions} positions does not fit a slot of {self._positions}")
        if src != dst:
            self._copy_positions(src, dst, positions)
        self._lengths[dst] = positions

    def _copy_positions(self, src: int, dst: int, positions: int) -> None:
        """Copy every layer's keys and values of positions ``[0, positions)`` from slot ``src`` to ``dst``."""
        raise NotImplementedError

    def warmup(self) -> None:
        """One prefill and one decode step in slot 0, so the first request pays no setup cost."""
        self.step([StepRow(0, np.zeros(2, np.int64), 0)])
        self.step([StepRow(0, np.zeros(1, np.int64), 2)])
        self.release(0)


def check_decoder_rows(
    model: str, rows: Sequence[StepRow], max_model_len: int, lengths: np.ndarray, vocab_size: int
) -> None:
    """What a decoder-only runner checks before a step: no encoder input, token ids inside the
    vocabulary (on CUDA an id past the embedding table is a device-side assert that poisons
    the process's context for every model), room in the slot, and each continuing row
    starting where its slot's cache ends (``lengths`` per slot)."""
    for row in rows:
        if row.encoder_states is not None:
            raise InvalidInput(f"model {model!r} is decoder-only; it takes no encoder input")
        if vocab_size and len(row.tokens) and (int(row.tokens.min()) < 0 or int(row.tokens.max()) >= vocab_size):
            raise InvalidInput(f"model {model!r}: token ids must lie in [0, {vocab_size})")
        end = row.start + len(row.tokens)
        if end > max_model_len:
            raise InvalidInput(
                f"model {model!r}: a sequence reached {end} positions, over the {max_model_len} a cache slot holds"
            )
        if row.start and row.start != lengths[row.slot]:
            raise RuntimeFailure(f"slot {row.slot} holds {lengths[row.slot]} positions, not {row.start}")
