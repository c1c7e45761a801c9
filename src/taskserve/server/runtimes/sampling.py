"""Choosing the next token from one row of logits, where the logits are: the runners call
it on their own thread right after the step (``DecoderRunner.sample``), and only token
ids leave them.

One ``TokenSampler`` per sequence (it keeps the sequence's seeded generator and, for the
penalties, the tokens it picked); never shared between threads. Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Nucleus sampling sorts only this many of the best tokens when they already hold
# the requested mass (they almost always do), instead of the whole vocabulary.
_NUCLEUS_CANDIDATES = 1024


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. ``temperature`` 0 is greedy (the other fields are then unused)."""

    temperature: float = 0.0
    # 0: no limit.
    top_k: int = 0
    # 1.0: no nucleus cut.
    top_p: float = 1.0
    # None: a fresh random seed.
    seed: int | None = None
    # Applied greedy or sampling, before the temperature. 1.0: none (transformers' and vLLM's
    # repetition_penalty, over the prompt's and the generated tokens).
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted once per token generated so far / once per time it was generated.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


class TokenSampler:
    """Greedy argmax or seeded sampling (temperature, then top-k, then top-p, as
    transformers orders them) over one row of logits, after the penalties: repetition
    (over ``prompt_ids`` and the tokens picked so far), then presence and frequency
    (over the tokens picked so far), as vLLM applies them."""

    def __init__(self, sampling: Sampling, prompt_ids: Sequence[int] = ()) -> None:
        self.sampling = sampling
        self._rng = np.random.default_rng(sampling.seed)
        self._prompt = np.unique(np.asarray(prompt_ids, np.int64)) if sampling.penalized else np.zeros(0, np.int64)
        # Token -> times picked (only kept when a penalty needs it).
        self._counts: dict[int, int] = {}

    @property
    def greedy_only(self) -> bool:
        """Plain argmax, no state: a runner may take it on the device without calling ``pick``."""
        return self.sampling.greedy and not self.sampling.penalized

    def pick(self, logits: np.ndarray) -> int:
        s = self.sampling
        if s.penalized:
            logits = self._penalize(logits)
        token = self._choose(logits)
        if s.penalized:
            self._counts[token] = self._counts.get(token, 0) + 1
        return token

    def _penalize(self, logits: np.ndarray) -> np.ndarray:
        s = self.sampling
        out = logits.astype(np.float32, copy=True)
        vocab = out.shape[0]
        generated = np.fromiter(self._counts, np.int64, len(self._counts))
        generated = generated[generated < vocab]
        if s.repetition_penalty != 1.0:
            seen = np.union1d(self._prompt[self._prompt < vocab], generated)
            values = out[seen]
            out[seen] = np.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
        if len(generated) and (s.presence_penalty or s.frequency_penalty):
            counts = np.asarray([self._counts[int(t)] for t in generated], np.float32)
            out[generated] -= s.presence_penalty + s.frequency_penalty * counts
        return out

    def _choose(self, logits: np.ndarray) -> int:
        s = self.sampling
        if s.greedy:
            return int(np.argmax(logits))  # the first of equal maxima, as torch.argmax
        scaled = logits.astype(np.float64) / s.temperature
        if 0 < s.top_k < scaled.shape[0]:
            candidates = np.argpartition(-scaled, s.top_k - 1)[: s.top_k]
        else:
            candidates = np.arange(scaled.shape[0])
        probs = _softmax(scaled[candidates])
        if s.top_p < 1.0:
            candidates, probs = _nucleus(candidates, probs, s.top_p)
        cumulative = np.cumsum(probs)
        index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
        return int(candidates[min(index, len(candidates) - 1)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    out: np.ndarray = e / e.sum()
    return out


def _nucleus(candidates: np.ndarray, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest set of most probable tokens whose mass reaches ``top_p`` (at least one)."""
    if len(probs) > _NUCLEUS_CANDIDATES:
        best = np.argpartition(-probs, _NUCLEUS_CANDIDATES - 1)[:_NUCLEUS_CANDIDATES]
        if probs[best].sum() >= top_p:
            candidates, probs = candidates[best], probs[best]
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
    kept = probs[keep]
    return candidates[keep], kept / kept.sum()


def sample_rows(logits: np.ndarray, samplers: Sequence[TokenSampler | None]) -> list[int | None]:
    """Each row's next token from its sampler (None: a row inside its prompt picks nothing)."""
    return [sampler.pick(logits[i]) if sampler is not None else None for i, sampler in enumerate(samplers)]
