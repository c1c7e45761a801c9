"""An encoder-decoder runner for the generation engine's ``DecoderRunner`` seam
(``server/runtimes/generation.py`` on the engine branch): the same ``step(rows)``,
``release(slot)``, ``max_slots``/``max_model_len``/``vocab_size``/``cache_bytes``, with
rows carrying ``slot``, ``tokens``, ``start`` and, on a sequence's first step,
``encoder_ids``.

It runs on two loaded runtimes: the encoder entry's graph and optimum's merged decoder
(``use_cache_branch`` false on a slot's first step, which computes the cross-attention
keys/values; true afterwards). Each slot keeps its encoder states, cross-attention
keys/values and self-attention cache here between steps: nothing goes back to the
caller. The merged decoder has no self-attention mask, so rows of different cache
lengths cannot share a call: each row runs alone, and its self-attention cache comes
back whole from the graph each step (a graph with an in-place cache, as the engine's
decoder-only export has, is the next step for speed).

Not wired yet: ``server/tasks/seq2seq.py`` runs the same loop over the request
batcher today; once the engine is merged, an engine-served text2text entry builds
this runner in place of ``OnnxDecoderRunner``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from taskserve.clients.datatypes import numpy_dtype
from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.runtimes.base import Runtime

_PAST = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")


class Row(Protocol):
    """What the engine's ``StepRow`` carries (structurally the same)."""

    @property
    def slot(self) -> int: ...
    @property
    def tokens(self) -> np.ndarray: ...
    @property
    def start(self) -> int: ...
    @property
    def encoder_ids(self) -> np.ndarray | None: ...


@dataclass
class _Slot:
    hidden: np.ndarray
    mask: np.ndarray
    past: dict[str, np.ndarray]
    length: int = 0


class Seq2SeqRunner:
    """Called from one engine thread, never concurrently."""

    def __init__(self, encoder: Runtime, decoder: Runtime, max_slots: int, max_model_len: int) -> None:
        self._encoder = encoder
        self._decoder = decoder
        self._max_slots = max_slots
        self._max_model_len = max_model_len
        inputs = {t.name: t for t in decoder.inputs}
        self._past = {
            n: (t.shape[1], t.shape[3], np.dtype(numpy_dtype(t.datatype))) for n, t in inputs.items() if _PAST.match(n)
        }
        if not self._past or "use_cache_branch" not in inputs:
            raise RuntimeFailure("the decoder is not optimum's merged decoder with a cache (use_cache_branch)")
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
    def cache_bytes(self) -> int:
        return sum(a.nbytes for s in self._slots.values() for a in (s.hidden, *s.past.values()))

    def step(self, rows: Sequence[Row]) -> np.ndarray:
        out = np.empty((len(rows), self._vocab), dtype=np.float32)
        for i, row in enumerate(rows):
            out[i] = self._row(row)
        return out

    def _row(self, row: Row) -> np.ndarray:
        if not 0 <= row.slot < self._max_slots:
            raise InvalidInput(f"slot {row.slot} is outside [0, {self._max_slots})")
        first = row.start == 0
        if first:
            self._slots[row.slot] = self._encode(row)
        slot = self._slots.get(row.slot)
        if slot is None or slot.length != row.start:
            raise InvalidInput(f"slot {row.slot} holds {slot.length if slot else 0} positions, not {row.start}")
        if row.start + len(row.tokens) > self._max_model_len:
            raise InvalidInput(f"slot {row.slot} would exceed {self._max_model_len} positions")
        result = self._decoder.infer(
            {
                "input_ids": np.asarray(row.tokens, dtype=np.int64)[None],
                "encoder_hidden_states": slot.hidden,
                "encoder_attention_mask": slot.mask,
                "use_cache_branch": np.asarray([not first]),
                **slot.past,
            },
            self._wanted,
        )
        for name in slot.past:
            # The cache branch returns placeholders for the cross-attention states: keep the first step's.
            if first or ".decoder." in name:
                slot.past[name] = result[name.replace("past_key_values.", "present.", 1)]
        slot.length += len(row.tokens)
        logits: np.ndarray = result["logits"][0, -1].astype(np.float32, copy=False)
        return logits

    def _encode(self, row: Row) -> _Slot:
        if row.encoder_ids is None or len(row.encoder_ids) == 0:
            raise InvalidInput(f"slot {row.slot}: an encoder-decoder's first step needs encoder_ids")
        ids = np.asarray(row.encoder_ids, dtype=np.int64)[None]
        mask = np.ones_like(ids)
        hidden = self._encoder.infer({"input_ids": ids, "attention_mask": mask}, ["last_hidden_state"])
        past = {n: np.zeros((1, heads, 0, size), dtype) for n, (heads, size, dtype) in self._past.items()}
        return _Slot(hidden["last_hidden_state"], mask, past)

    def release(self, slot: int) -> None:
        self._slots.pop(slot, None)

    def close(self) -> None:
        self._slots.clear()
        self._encoder.close()
        self._decoder.close()
