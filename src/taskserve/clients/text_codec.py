"""Requests and results of the typed text services (taskserve.v1): protobuf <-> client types.

Pure functions shared by the sync and asyncio namespaces, so each namespace
method is only "build request, call, convert result".
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt

from taskserve.clients.results import (
    AnswerSpan,
    Classification,
    Entity,
    LabelScore,
    MaskCompletion,
    MaskPrediction,
)
from taskserve.protocol.generated.taskserve.v1 import (
    common_pb2,
    fill_mask_pb2,
    question_answering_pb2,
    sentence_embedding_pb2,
    text_classification_pb2,
    token_classification_pb2,
)

ScoreFunction = Literal["softmax", "sigmoid", "none"]
Aggregation = Literal["none", "first", "average", "max"]

_SCORE_FUNCTIONS = {
    None: text_classification_pb2.SCORE_FUNCTION_UNSPECIFIED,
    "softmax": text_classification_pb2.SCORE_FUNCTION_SOFTMAX,
    "sigmoid": text_classification_pb2.SCORE_FUNCTION_SIGMOID,
    "none": text_classification_pb2.SCORE_FUNCTION_NONE,
}
_AGGREGATIONS = {
    None: token_classification_pb2.AGGREGATION_STRATEGY_UNSPECIFIED,
    "none": token_classification_pb2.AGGREGATION_STRATEGY_NONE,
    "first": token_classification_pb2.AGGREGATION_STRATEGY_FIRST,
    "average": token_classification_pb2.AGGREGATION_STRATEGY_AVERAGE,
    "max": token_classification_pb2.AGGREGATION_STRATEGY_MAX,
}


def check_texts(texts: Sequence[str], what: str = "texts") -> list[str]:
    # A bare string is a Sequence[str] too: catch it before it becomes one request per character.
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a list of strings, even for one text")
    return list(texts)


def model_ref(model: str, version: str) -> common_pb2.ModelRef:
    if not model:
        raise ValueError("model must name a model")
    return common_pb2.ModelRef(name=model, version=version)


def request_options(priority: int, queue_timeout_us: int) -> common_pb2.RequestOptions:
    if priority < 0 or queue_timeout_us < 0:
        raise ValueError("priority and queue_timeout_us must be >= 0 (0: the model's default)")
    return common_pb2.RequestOptions(priority=priority, timeout_us=queue_timeout_us)


def classify_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    texts: Sequence[str],
    top_k: int,
    function: ScoreFunction | None,
    truncate: bool | None,
) -> text_classification_pb2.ClassifyTextRequest:
    if function not in _SCORE_FUNCTIONS:
        raise ValueError(f"function {function!r}: use one of softmax, sigmoid, none")
    return text_classification_pb2.ClassifyTextRequest(
        model=ref, options=opts, texts=check_texts(texts), top_k=top_k,
        function=_SCORE_FUNCTIONS[function], truncate=truncate,
    )  # fmt: skip


def classifications(results: Iterable[common_pb2.Classification]) -> list[Classification]:
    return [Classification(tuple(LabelScore(ls.label, ls.score, ls.index) for ls in r.labels)) for r in results]


def tag_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    texts: Sequence[str],
    aggregation: Aggregation | None,
    ignore_labels: Sequence[str],
    truncate: bool | None,
) -> token_classification_pb2.TagRequest:
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation!r}: use one of none, first, average, max")
    return token_classification_pb2.TagRequest(
        model=ref, options=opts, texts=check_texts(texts), aggregation=_AGGREGATIONS[aggregation],
        ignore_labels=check_texts(ignore_labels, "ignore_labels"), truncate=truncate,
    )  # fmt: skip


def tagged(response: token_classification_pb2.TagResponse) -> list[tuple[Entity, ...]]:
    return [tuple(Entity(e.label, e.score, e.start, e.end, e.text) for e in r.entities) for r in response.results]


def embed_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    texts: Sequence[str],
    normalize: bool | None,
    truncate: bool | None,
) -> sentence_embedding_pb2.EmbedRequest:
    return sentence_embedding_pb2.EmbedRequest(
        model=ref, options=opts, texts=check_texts(texts), normalize=normalize, truncate=truncate
    )


def embeddings(response: sentence_embedding_pb2.EmbedResponse) -> npt.NDArray[np.float32]:
    """An (n_texts, dimension) float32 array."""
    out = np.empty((len(response.embeddings), response.dimension), dtype=np.float32)
    for i, emb in enumerate(response.embeddings):
        out[i] = emb.values
    return out


def compare_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    source: str,
    candidates: Sequence[str],
    truncate: bool | None,
) -> sentence_embedding_pb2.CompareSentencesRequest:
    return sentence_embedding_pb2.CompareSentencesRequest(
        model=ref,
        options=opts,
        source=source,
        candidates=check_texts(candidates, "candidates"),
        truncate=truncate,
    )


def similarity_scores(response: sentence_embedding_pb2.CompareSentencesResponse) -> npt.NDArray[np.float32]:
    return np.asarray(response.scores, dtype=np.float32)


def answer_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    items: Sequence[tuple[str, str]],
    top_k: int,
    max_answer_length: int,
    doc_stride: int,
    allow_no_answer: bool,
) -> question_answering_pb2.AnswerRequest:
    pairs = [question_answering_pb2.QuestionContext(question=q, context=c) for q, c in items]
    return question_answering_pb2.AnswerRequest(
        model=ref, options=opts, items=pairs, top_k=top_k, max_answer_length=max_answer_length,
        doc_stride=doc_stride, allow_no_answer=allow_no_answer,
    )  # fmt: skip


def answers(response: question_answering_pb2.AnswerResponse) -> list[tuple[AnswerSpan, ...]]:
    return [tuple(AnswerSpan(a.text, a.score, a.start, a.end) for a in r.answers) for r in response.results]


def fill_mask_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    texts: Sequence[str],
    top_k: int,
    truncate: bool | None,
) -> fill_mask_pb2.FillMaskRequest:
    return fill_mask_pb2.FillMaskRequest(
        model=ref, options=opts, texts=check_texts(texts), top_k=top_k, truncate=truncate
    )


def filled(response: fill_mask_pb2.FillMaskResponse) -> list[tuple[MaskPrediction, ...]]:
    return [
        tuple(
            MaskPrediction(
                m.start,
                tuple(MaskCompletion(c.token, c.token_id, c.score, c.sequence) for c in m.completions),
            )
            for m in r.masks
        )
        for r in response.results
    ]
