"""Extractive question answering: (question, context) -> answer spans.

A context longer than the model's window is read in overlapping windows
(``doc_stride`` tokens shared between neighbours); the best spans of all
windows compete, so nothing is cut silently.

task_options: ``start_output`` / ``end_output`` (default "start_logits" /
"end_logits"), ``top_k`` (1), ``max_answer_length`` (30 tokens), ``doc_stride``
(128 tokens), plus the tokenizer's keys (``max_length`` is the window size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field
from tokenizers import Encoding

from taskserve.server.errors import InvalidInput
from taskserve.server.tasks.base import CallOptions, check_count, softmax
from taskserve.server.tasks.text import TextOptions, TextTask
from taskserve.server.tasks.tokenization import TokenBatch

# A window needs room for at least this many context tokens beside the question.
_MIN_CONTEXT_TOKENS = 8


@dataclass(frozen=True)
class QAItem:
    question: str
    context: str


@dataclass(frozen=True)
class AnswerParams:
    # 0 in any field: task_options, else the documented default.
    top_k: int = 0
    max_answer_length: int = 0
    doc_stride: int = 0
    allow_no_answer: bool = False


@dataclass(frozen=True)
class Answer:
    text: str
    score: float
    # Character offsets [start, end) into the context; 0, 0 for "no answer".
    start: int
    end: int


@dataclass(frozen=True)
class _Windows:
    batch: TokenBatch
    # The item each window (row) belongs to.
    owners: list[int]


def best_spans(
    encoding: Encoding, start_logits: np.ndarray, end_logits: np.ndarray, max_answer_length: int, k: int
) -> tuple[list[tuple[int, int, float]], float]:
    """The ``k`` best (start token, end token, probability) spans of one window that lie
    in the context, and the window's "no answer" probability (the first token's)."""
    n = len(encoding.ids)
    in_context = np.array([s == 1 for s in encoding.sequence_ids], dtype=bool)
    # The first token ([CLS]) stays scorable: its probability is the "no answer" score.
    allowed = in_context.copy()
    allowed[0] = True
    p_start = softmax(np.where(allowed, start_logits[:n], -1e4))
    p_end = softmax(np.where(allowed, end_logits[:n], -1e4))
    null = float(p_start[0] * p_end[0])
    p_start = np.where(in_context, p_start, 0.0)
    p_end = np.where(in_context, p_end, 0.0)
    # Spans with start <= end < start + max_answer_length.
    scores = np.tril(np.triu(np.outer(p_start, p_end)), max_answer_length - 1)
    flat = np.argsort(-scores, axis=None, kind="stable")[:k]
    spans = []
    for index in flat:
        s, e = np.unravel_index(index, scores.shape)
        if scores[s, e] > 0:
            spans.append((int(s), int(e), float(scores[s, e])))
    return spans, null


def word_bounds(encoding: Encoding) -> list[tuple[int, int]]:
    """Per token, the character span of the context word it belongs to, so an answer
    starting or ending inside a word (a "##subword") covers the whole word."""
    bounds = list(encoding.offsets)
    words: dict[int, tuple[int, int]] = {}
    for t, (word, seq) in enumerate(zip(encoding.word_ids, encoding.sequence_ids, strict=True)):
        if word is not None and seq == 1:
            start, end = bounds[t]
            first, last = words.get(word, (start, end))
            words[word] = (min(first, start), max(last, end))
    for t, (word, seq) in enumerate(zip(encoding.word_ids, encoding.sequence_ids, strict=True)):
        if word is not None and seq == 1:
            bounds[t] = words[word]
    return bounds


class QuestionAnsweringOptions(TextOptions):
    top_k: int = Field(1, ge=1, description="answers per item when a request does not say")
    max_answer_length: int = Field(30, ge=1, description="tokens in an answer when a request does not say")
    doc_stride: int = Field(
        128, ge=0, description="context tokens neighbouring windows share (max_length is the window)"
    )
    start_output: str | None = Field(None, description="the start-logits output (default start_logits)")
    end_output: str | None = Field(None, description="the end-logits output (default end_logits)")


class QuestionAnswerer(TextTask):
    task = "question-answering"
    options: QuestionAnsweringOptions

    def _check(self, items: Sequence[QAItem]) -> None:
        check_count("items", len(items), self.limits)
        limit = self.limits.max_text_chars
        for i, item in enumerate(items):
            for field in ("question", "context"):
                value: str = getattr(item, field)
                if not value.strip():
                    raise InvalidInput(f"items[{i}].{field} is empty")
                if len(value) > limit:
                    raise InvalidInput(
                        f"items[{i}].{field} has {len(value)} characters, over the limit of {limit}"
                    )

    def _encode(self, items: Sequence[QAItem], stride: int) -> _Windows:
        """Blocking: every item's windows, padded into one batch."""
        tok = self.tokenizer
        encodings: list[Encoding] = []
        owners: list[int] = []
        for i, item in enumerate(items):
            room = tok.max_length - tok.count_tokens(item.question) - tok.special_tokens_for_pair()
            if room < _MIN_CONTEXT_TOKENS:
                raise InvalidInput(
                    f"items[{i}].question is too long: model {self.model.name!r} reads {tok.max_length} tokens at a "
                    f"time, which leaves {max(room, 0)} for the context; shorten the question"
                )
            windows = tok.encode_windows(item.question, item.context, min(stride, room // 2))
            encodings += windows
            owners += [i] * len(windows)
        return _Windows(self.batch(encodings), owners)

    async def answer(
        self, items: Sequence[QAItem], params: AnswerParams, options: CallOptions
    ) -> list[tuple[Answer, ...]]:
        """The best answers per item, best first."""
        self._check(items)
        top_k = params.top_k or self.options.top_k
        max_len = params.max_answer_length or self.options.max_answer_length
        stride = params.doc_stride or self.options.doc_stride
        windows = await self.offload("preprocess", self._encode, items, stride)
        start_name = self.output_name("start_logits", self.options.start_output, "start_output")
        end_name = self.output_name("end_logits", self.options.end_output, "end_output")
        out = await self.run_model(
            windows.batch, options, [start_name, end_name], per_token=[start_name, end_name]
        )
        starts, ends = out[start_name].astype(np.float32), out[end_name].astype(np.float32)

        def postprocess() -> list[tuple[Answer, ...]]:
            found: list[dict[tuple[int, int], float]] = [{} for _ in items]
            null = [1.0] * len(items)
            for row, (owner, enc) in enumerate(zip(windows.owners, windows.batch.encodings, strict=True)):
                # Extra candidates: aligning to words merges some of them.
                spans, window_null = best_spans(enc, starts[row], ends[row], max_len, top_k * 2 + 10)
                # The weakest "no answer" over the windows, as Hugging Face pipelines do:
                # one window holding the answer is enough.
                null[owner] = min(null[owner], window_null)
                bounds = word_bounds(enc)
                for s, e, score in spans:
                    # Windows overlap: the same span found twice keeps its best score.
                    key = (bounds[s][0], bounds[e][1])
                    found[owner][key] = max(score, found[owner].get(key, 0.0))
            results = []
            for i, item in enumerate(items):
                answers = [Answer(item.context[a:b], score, a, b) for (a, b), score in found[i].items()]
                if params.allow_no_answer:
                    answers.append(Answer("", null[i], 0, 0))
                answers.sort(key=lambda a: (-a.score, a.start, a.end))
                results.append(tuple(answers[:top_k]))
            return results

        return await self.offload("postprocess", postprocess)
