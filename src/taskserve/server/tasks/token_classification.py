"""Token classification (named entities, ...): texts -> entities with character offsets.

task_options: ``output`` (default "logits"), ``aggregation_strategy`` ("none" |
"first" | "average" | "max", default "first"), ``ignore_labels`` (default ["O"]),
``truncation``, plus the tokenizer's keys.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field
from tokenizers import Encoding

from taskserve.server.tasks.base import CallOptions, check_texts, softmax
from taskserve.server.tasks.options import Choice
from taskserve.server.tasks.text import TextOptions, TextTask


class Aggregation(enum.Enum):
    NONE = "none"
    FIRST = "first"
    AVERAGE = "average"
    MAX = "max"


@dataclass(frozen=True)
class TagParams:
    # None: task_options.aggregation_strategy, else FIRST.
    aggregation: Aggregation | None = None
    # None: task_options.ignore_labels, else ("O",).
    ignore_labels: tuple[str, ...] | None = None
    truncate: bool | None = None


@dataclass(frozen=True)
class Entity:
    label: str
    score: float
    # Character offsets [start, end) into the text (Python str indices).
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class _Word:
    """A word (or, without aggregation, a token) with its chosen label."""

    label: str
    score: float
    start: int
    end: int


def _split_tag(label: str) -> tuple[str, str]:
    """("B" | "I", entity type); a label without a B-/I- prefix counts as inside."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _words(encoding: Encoding) -> list[list[int]]:
    """Token indices grouped by word; special tokens left out."""
    groups: list[list[int]] = []
    last: int | None = None
    for t, (word, special) in enumerate(zip(encoding.word_ids, encoding.special_tokens_mask, strict=True)):
        if special:
            last = None
            continue
        if word is not None and word == last and groups:
            groups[-1].append(t)
        else:
            groups.append([t])
        last = word
    return groups


def _label_word(probs: np.ndarray, tokens: list[int], strategy: Aggregation) -> tuple[int, float]:
    """The class and score of a word from its tokens' probabilities."""
    if strategy is Aggregation.AVERAGE:
        p = probs[tokens].mean(axis=0)
    elif strategy is Aggregation.MAX:
        p = probs[tokens[int(np.argmax(probs[tokens].max(axis=1)))]]
    else:
        p = probs[tokens[0]]
    index = int(np.argmax(p))
    return index, float(p[index])


def _group(words: list[_Word]) -> list[tuple[str, list[_Word]]]:
    """Merge adjacent words of one entity type; a "B-" word starts a new entity."""
    groups: list[tuple[str, list[_Word]]] = []
    for word in words:
        bi, kind = _split_tag(word.label)
        if groups and groups[-1][0] == kind and bi != "B":
            groups[-1][1].append(word)
        else:
            groups.append((kind, [word]))
    return groups


def extract_entities(
    text: str,
    encoding: Encoding,
    probs: np.ndarray,
    labels: Sequence[str],
    strategy: Aggregation,
    ignore: set[str],
) -> tuple[Entity, ...]:
    """Entities of one text from its per-token class probabilities (tokens, classes)."""
    offsets = encoding.offsets
    if strategy is Aggregation.NONE:
        entities = []
        for t, special in enumerate(encoding.special_tokens_mask):
            index = int(np.argmax(probs[t]))
            if special or labels[index] in ignore:
                continue
            start, end = offsets[t]
            entities.append(Entity(labels[index], float(probs[t, index]), start, end, text[start:end]))
        return tuple(entities)
    words = []
    for tokens in _words(encoding):
        index, score = _label_word(probs, tokens, strategy)
        words.append(_Word(labels[index], score, offsets[tokens[0]][0], offsets[tokens[-1]][1]))
    entities = []
    for kind, members in _group(words):
        if kind in ignore or any(w.label in ignore for w in members):
            continue
        start, end = members[0].start, members[-1].end
        score = float(np.mean([w.score for w in members]))
        entities.append(Entity(kind, score, start, end, text[start:end]))
    return tuple(entities)


class TokenClassificationOptions(TextOptions):
    aggregation_strategy: Choice[Aggregation] = Field(
        Aggregation.FIRST, description="how word pieces join into entities when a request does not say"
    )
    ignore_labels: list[str] = Field(["O"], description="labels never reported when a request does not say")


class TokenClassifier(TextTask):
    task = "token-classification"
    options: TokenClassificationOptions

    def _strategy(self, requested: Aggregation | None) -> Aggregation:
        if requested is not None:
            return requested
        return self.options.aggregation_strategy

    def _ignore(self, requested: tuple[str, ...] | None) -> set[str]:
        if requested:
            return set(requested)
        return set(self.options.ignore_labels)

    async def tag(
        self, texts: Sequence[str], params: TagParams, options: CallOptions
    ) -> list[tuple[Entity, ...]]:
        """Entities per text, in text order."""
        check_texts("texts", texts, self.limits)
        batch = await self.tokenize(texts, self.truncate(params.truncate))
        output = self.output_name("logits", self.options.output)
        logits = (await self.run_model(batch, options, [output], per_token=[output]))[output].astype(
            np.float32
        )
        strategy, ignore = self._strategy(params.aggregation), self._ignore(params.ignore_labels)
        labels = self.labels(logits.shape[-1])

        def postprocess() -> list[tuple[Entity, ...]]:
            results = []
            for text, encoding, row in zip(texts, batch.encodings, logits, strict=True):
                probs = softmax(row[: len(encoding.ids)], axis=-1)
                results.append(extract_entities(text, encoding, probs, labels, strategy, ignore))
            return results

        return await self.offload("postprocess", postprocess)
