"""The per-token parts of text generation: turning generated token ids into text that is
safe to stream. Picking the next token (``Sampling``, ``TokenPicker``) lives with the
runners, which sample where the logits are (``runtimes/sampling.py``); re-exported here.

Pure tokenizer calls; each generation owns one ``TextStream`` (not shared between threads).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from taskserve.server.runtimes.sampling import Sampling, TokenSampler

__all__ = ["IncrementalDecoder", "Sampling", "TextStream", "TokenPicker"]

# The task's name for it since before sampling moved into the runners.
TokenPicker = TokenSampler

# How many prompt tokens seed the detokenizer: enough context that the first
# generated token decodes with its leading space (SentencePiece drops it at the start).
_PROMPT_CONTEXT = 5


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
