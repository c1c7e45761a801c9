"""The encoder-decoder runner of the generation engine (``DecoderRunner`` in
``server/runtimes/generation.py``): T5, BART and Marian entries exported with
``--task text2text-generation`` run their decoder steps here, on the engine's thread.

The task runs the encoder once per request (the ``NAME-encoder`` entry, through its own
batcher) and hands the states with the sequence; they arrive on the sequence's first
row (``StepRow.encoder_states``). The decoder is optimum's merged decoder
(``use_cache_branch`` false on a slot's first step, which computes the cross-attention
keys/values; true afterwards). Each slot keeps its encoder states, cross-attention
keys/values and self-attention cache here between steps: nothing goes back to the task.

Trade-off, on purpose: the merged decoder has no self-attention mask, so only rows whose
self-attention caches hold the same number of positions can share a model call without
changing their results. Each step groups the rows by cache length: a group is one call
(sources of different lengths padded, the encoder attention mask hiding the padding),
groups run back to back within the engine iteration. Sequences admitted together stay
in lockstep and batch; sequences that arrived at different times share the iteration
but not a matrix multiply. Each slot's self-attention cache comes back whole from the
graph every step (copied, growing with the output). A decoder graph with a
self-attention mask over an in-place cache, as the engine's decoder-only export has,
is what batching every row needs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from taskserve.protocol.datatypes import numpy_dtype
from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.runtimes.base import Runtime
from taskserve.server.runtimes.generation import StepRow
from taskserve.server.runtimes.sampling import TokenSampler, sample_rows

_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


@dataclass
class _Slot:
    hidden: np.ndarray
    mask: np.ndarray
    past: dict[str, np.ndarray]
    length: int = 0


class Seq2SeqRunner:
    """Called from one engine thread, never concurrently."""

    def __init__(self, decoder: Runtime, max_slots: int, max_model_len: int) -> None:
        self._decoder = decoder
        self._max_slots = max_slots
        self._max_model_len = max_model_len
        inputs = {t.name: t for t in decoder.inputs}
        self._past = {
            n: (t.shape[1], t.shape[3], np.dtype(numpy_dtype(t.datatype))) for n, t in inputs.items() if _PAST.match(n)
        }
        if not self._past or not {"use_cache_branch", "encoder_hidden_states"} <= set(inputs):
            raise RuntimeFailure("the decoder is not optimum's merged decoder with a cache (use_cache_branch)")
        self._hidden_dtype = np.dtype(numpy_dtype(inputs["encoder_hidden_states"].datatype))
        mask = inputs.get("encoder_attention_mask")
        self._mask_dtype = np.dtype(numpy_dtype(mask.datatype)) if mask is not None else np.dtype(np.int64)
        logits = next((t for t in decoder.outputs if t.name == "logits"), None)
        if logits is None or logits.shape[-1] < 1:
            raise RuntimeFailure("the decoder has no logits output of a known vocabulary size")
        self._vocab = logits.shape[-1]
        self._wanted = ["logits", *(n.replace("past_key_values.", "present.", 1) for n in self._past)]
        self._slots: dict[int, _Slot] = {}

    @property
    def max_slots(self) -> int:
        return self._max_slots

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def description(self) -> str:
        return f"{self._decoder.description}, encoder-decoder on the generation engine ({self._max_slots} slots)"

    @property
    def cache_bytes(self) -> int:
        return sum(a.nbytes for s in self._slots.values() for a in (s.hidden, *s.past.values()))

    def sample(self, rows: Sequence[StepRow], samplers: Sequence[TokenSampler | None]) -> list[int | None]:
        return sample_rows(self.step(rows), samplers)

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        groups: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(rows):
            self._check(row)
            groups.setdefault((row.start, len(row.tokens)), []).append(i)
        out = np.empty((len(rows), self._vocab), dtype=np.float32)
        for members in groups.values():
            # Equal cache lengths: one call (the graph has no self-attention mask to tell them apart).
            out[members] = self._run([rows[i] for i in members])
        return out

    def _check(self, row: StepRow) -> None:
        if not 0 <= row.slot < self._max_slots:
            raise InvalidInput(f"slot {row.slot} is outside [0, {self._max_slots})")
        if row.start == 0:
            self._slots[row.slot] = self._encode(row)
        slot = self._slots.get(row.slot)
        if slot is None or slot.length != row.start:
            raise InvalidInput(f"slot {row.slot} holds {slot.length if slot else 0} positions, not {row.start}")
        if row.start + len(row.tokens) > self._max_model_len:
            raise InvalidInput(f"slot {row.slot} would exceed {self._max_model_len} positions")

    def _run(self, rows: list[StepRow]) -> np.ndarray:
        """One decoder call for rows of equal cache length. Sources of different lengths are
        padded to the longest: the encoder attention mask hides the padding from cross-attention,
        and each slot keeps its own cross-attention keys/values unpadded."""
        first = rows[0].start == 0
        slots = [self._slots[row.slot] for row in rows]
        lengths = [s.hidden.shape[1] for s in slots]
        longest = max(lengths)

        def padded(arrays: list[np.ndarray], axis: int) -> np.ndarray:
            if len(arrays) == 1:
                return arrays[0]
            widths = [[(0, longest - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)] for a in arrays]
            return np.concatenate([np.pad(a, w) for a, w in zip(arrays, widths, strict=True)])

        past: dict[str, np.ndarray] = {}
        for name in self._past:
            if first:  # placeholders: the no-cache branch computes the cross-attention keys/values
                heads, size, dtype = self._past[name]
                past[name] = np.zeros((len(rows), heads, 0, size), dtype)
            elif ".decoder." in name:
                past[name] = np.concatenate([s.past[name] for s in slots]) if len(slots) > 1 else slots[0].past[name]
            else:
                past[name] = padded([s.past[name] for s in slots], 2)
        result = self._decoder.infer(
            {
                "input_ids": np.stack([np.asarray(row.tokens, dtype=np.int64) for row in rows]),
                "encoder_hidden_states": padded([s.hidden for s in slots], 1),
                "encoder_attention_mask": padded([s.mask for s in slots], 1),
                "use_cache_branch": np.asarray([not first]),
                **past,
            },
            self._wanted,
        )
        for i, (slot, length) in enumerate(zip(slots, lengths, strict=True)):
            for name in self._past:
                present = result[name.replace("past_key_values.", "present.", 1)]
                if ".decoder." in name:
                    slot.past[name] = present[i : i + 1]
                elif first:
                    # The cache branch returns placeholders for the cross-attention states: keep the first step's.
                    slot.past[name] = np.ascontiguousarray(present[i : i + 1, :, :length])
            slot.length += len(rows[i].tokens)
        logits: np.ndarray = result["logits"][:, -1].astype(np.float32, copy=False)
        return logits

    def _encode(self, row: StepRow) -> _Slot:
        states = row.encoder_states
        if states is None or states.ndim != 2 or len(states) == 0:
            raise InvalidInput(
                f"slot {row.slot}: an encoder-decoder's first step needs encoder_states (source length, hidden size)"
            )
        hidden = np.ascontiguousarray(states[None], dtype=self._hidden_dtype)
        mask = np.ones((1, len(states)), dtype=self._mask_dtype)
        # The first step (no cache) computes the cross-attention keys/values; these are placeholders.
        past = {n: np.zeros((1, heads, 0, size), dtype) for n, (heads, size, dtype) in self._past.items()}
        return _Slot(hidden, mask, past)

    def release(self, slot: int) -> None:
        self._slots.pop(slot, None)

    @property
    def copies_prefixes(self) -> bool:
        return False  # a slot's cache depends on the source sentence, not the decoder tokens alone

    def copy_prefix(self, src: int, dst: int, positions: int) -> None:
        raise RuntimeFailure("encoder-decoder caches depend on their source; they have no prefix cache")

    def close(self) -> None:
        self._slots.clear()
        self._decoder.close()
