"""Text to token-id tensors with Hugging Face ``tokenizers``.

Blocking (the Rust tokenizer runs on the calling thread): call these methods on
the task worker pool. A ``TextTokenizer`` is safe to use from several threads:
the tokenizers it encodes with are never reconfigured after creation.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import Field
from tokenizers import Encoding, Tokenizer

from taskserve.server.errors import InvalidInput
from taskserve.server.repository.paths import resolve_inside, shown
from taskserve.server.tasks.base import TaskConfigError
from taskserve.server.tasks.options import ModelFile, TaskOptions

# Above this a tokenizer_config's model_max_length is a "no limit" sentinel (1e30).
_MAX_SANE_LENGTH = 1_000_000
_DEFAULT_MAX_LENGTH = 512


class TokenizerOptions(TaskOptions):
    """The keys a ``TextTokenizer`` reads."""

    tokenizer: ModelFile = Field("tokenizer.json", description="the tokenizer file (Hugging Face tokenizers JSON)")
    max_length: int | None = Field(
        None, ge=2, description="tokens per text, special tokens included (default: tokenizer_config.json's, else 512)"
    )
    pad_token_id: int | None = Field(
        None, description="padding id (default: tokenizer_config.json's pad token, else [PAD] / <pad>, else 0)"
    )


@dataclass(frozen=True)
class TokenBatch:
    """Encodings of several rows padded to one length."""

    encodings: list[Encoding]
    # Model inputs keyed by name, each (rows, length).
    arrays: dict[str, np.ndarray]

    @property
    def length(self) -> int:
        return int(self.arrays["input_ids"].shape[1])


class TextTokenizer:
    """A model's tokenizer (``tokenizer.json`` in the model directory) with its limits.

    Reads ``TokenizerOptions``; unset ones come from ``tokenizer_config.json``.
    """

    def __init__(self, model_dir: Path, options: TokenizerOptions, model_name: str) -> None:
        path = resolve_inside(model_dir, options.tokenizer, "task_options.tokenizer")
        if not path.is_file():
            raise TaskConfigError(
                f"model {model_name!r}: tokenizer file {shown(path, model_dir)} is missing; "
                "export the model with its tokenizer"
            )
        self.model_name = model_name
        self._plain = Tokenizer.from_file(str(path))
        self._plain.no_padding()
        self._plain.no_truncation()
        self._serialized = self._plain.to_str()
        hf_config = _read_tokenizer_config(model_dir)
        self.max_length = _max_length(options.max_length, hf_config)
        self.pad_id = self._pad_id(options.pad_token_id, hf_config)
        self._truncating: dict[tuple[int, int, str], Tokenizer] = {}
        self._lock = threading.Lock()
        self.hf_config = hf_config

    # -- lookups -----------------------------------------------------------------

    def token_to_id(self, token: str) -> int | None:
        value = self._plain.token_to_id(token)
        return int(value) if value is not None else None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._plain.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def encode_ids(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one text, never truncated."""
        return list(self._plain.encode(text, add_special_tokens=add_special_tokens).ids)

    def _pad_id(self, configured: int | None, hf_config: Mapping[str, object]) -> int:
        if configured is not None:
            return configured
        candidates = [hf_config.get("pad_token"), "[PAD]", "<pad>"]
        for token in candidates:
            if isinstance(token, dict):
                token = token.get("content")
            if isinstance(token, str) and (found := self.token_to_id(token)) is not None:
                return found
        return 0

    # -- encoding ------------------------------------------------------------------

    def encode(self, texts: Sequence[str], truncate: bool, what: str = "texts") -> list[Encoding]:
        """Encode texts with special tokens. Texts over ``max_length`` tokens are cut
        when ``truncate``, refused with InvalidInput otherwise (never cut silently)."""
        encodings: list[Encoding] = self._plain.encode_batch(list(texts))
        long = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if long and not truncate:
            i = long[0]
            raise InvalidInput(
                f"{what}[{i}] is {len(encodings[i].ids)} tokens long, over the {self.max_length} tokens model "
                f"{self.model_name!r} accepts; shorten it or set truncate"
            )
        if long:
            cutter = self._configured(self.max_length, 0, "longest_first")
            for i, enc in zip(long, cutter.encode_batch([texts[i] for i in long]), strict=True):
                encodings[i] = enc
        return encodings

    def encode_windows(self, question: str, context: str, stride: int) -> list[Encoding]:
        """Encode a (question, context) pair as overlapping windows of at most
        ``max_length`` tokens; only the context is cut, consecutive windows share
        ``stride`` context tokens."""
        cutter = self._configured(self.max_length, stride, "only_second")
        first: Encoding = cutter.encode(question, context)
        return [first, *first.overflowing]

    def count_tokens(self, text: str) -> int:
        return len(self._plain.encode(text, add_special_tokens=False).ids)

    def special_tokens_for_pair(self) -> int:
        return int(self._plain.num_special_tokens_to_add(True))

    def _configured(self, max_length: int, stride: int, strategy: str) -> Tokenizer:
        """A truncating copy per setting, created once: a tokenizer's truncation is
        shared state, so one shared instance cannot serve different settings."""
        key = (max_length, stride, strategy)
        with self._lock:
            tok = self._truncating.get(key)
            if tok is None:
                tok = Tokenizer.from_str(self._serialized)
                tok.no_padding()
                tok.enable_truncation(max_length, stride=stride, strategy=strategy)
                self._truncating[key] = tok
        return tok

    def pad(
        self,
        encodings: Sequence[Encoding],
        input_names: set[str] | None,
        dtypes: Mapping[str, np.dtype[np.generic]],
    ) -> TokenBatch:
        """Pad rows to the longest and build the model inputs it declares
        (input_ids, attention_mask, token_type_ids)."""
        length = max(len(e.ids) for e in encodings)
        rows = len(encodings)
        ids = np.full((rows, length), self.pad_id, dtype=np.int64)
        mask = np.zeros((rows, length), dtype=np.int64)
        types = np.zeros((rows, length), dtype=np.int64)
        for r, enc in enumerate(encodings):
            n = len(enc.ids)
            ids[r, :n] = enc.ids
            mask[r, :n] = 1
            types[r, :n] = enc.type_ids
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        if input_names is not None:
            arrays = {k: v for k, v in arrays.items() if k in input_names or k == "input_ids"}
        return TokenBatch(
            encodings=list(encodings),
            arrays={k: v.astype(dtypes.get(k, np.dtype(np.int64)), copy=False) for k, v in arrays.items()},
        )


def _read_tokenizer_config(model_dir: Path) -> dict[str, object]:
    path = resolve_inside(model_dir, "tokenizer_config.json", "tokenizer config")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _max_length(configured: int | None, hf_config: Mapping[str, object]) -> int:
    if configured is not None:
        return configured
    value = hf_config.get("model_max_length")
    if not isinstance(value, (int, float)) or value <= 0 or value > _MAX_SANE_LENGTH:
        return _DEFAULT_MAX_LENGTH
    return int(value)
