"""The per-token parts of text generation: picking the next token from logits, and
turning generated token ids into text that is safe to stream.

Pure numpy and tokenizer calls; each generation owns one ``TokenPicker`` and one
``TextStream`` (neither is shared between threads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# How many prompt tokens seed the detokenizer: enough context that the first
# generated token decodes with its leading space (SentencePiece drops it at the start).
_PROMPT_CONTEXT = 5
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


class TokenPicker:
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


class IncrementalDecoder:
    """Generated token ids -> text deltas that never split a UTF-8 character.

    Byte-level tokenizers emit a multi-byte character over several tokens; decoding
    them one by one gives U+FFFD. The decoder re-decodes a short window and only
    releases text once the window decodes cleanly (the approach of Hugging Face TGI).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> None:
        self._decode = decode
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token: int) -> str:
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. an unfinished character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            # Keep the window short: only the last released tokens give context.
            return after[len(before) :]
        return ""


class TextStream:
    """Token ids -> the text to send: no broken characters, no text that may still
    turn out to start a stop string, and nothing from a stop string on.

    ``push`` returns the text that can be sent now; after a stop string matched,
    ``stopped`` is true and the generation should end. ``finish`` returns the rest.
    """

    def __init__(
        self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int], stops: Sequence[str] = ()
    ) -> None:
        self._decoder = IncrementalDecoder(decode, prompt_ids)
        self._stops = tuple(s for s in stops if s)
        self._text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        self._text += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text, start = self._text, self._sent
        # A stop string cannot start before `start`: any text that could begin one was held back.
        found = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        if found:
            end = min(found)
            self.stopped = True
        elif final or not self._stops:
            end = len(text)
        else:
            end = len(text) - self._held(text, start)
        self._sent = end
        return text[start:end]

    def _held(self, text: str, start: int) -> int:
        """Length of the longest tail of ``text[start:]`` that begins some stop string."""
        longest = min(max(len(s) for s in self._stops) - 1, len(text) - start)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stops):
                return k
        return 0
