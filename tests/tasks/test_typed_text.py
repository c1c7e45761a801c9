"""Typed text services end to end: tiny exported models -> server -> generated stubs,
checked against Hugging Face pipelines running the same (PyTorch) models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import fill_mask_pb2 as fm
from taskserve.protocol.generated.taskserve.v1 import fill_mask_pb2_grpc as fm_grpc
from taskserve.protocol.generated.taskserve.v1 import question_answering_pb2 as qa
from taskserve.protocol.generated.taskserve.v1 import question_answering_pb2_grpc as qa_grpc
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2 as tc
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2_grpc as tc_grpc
from taskserve.protocol.generated.taskserve.v1 import token_classification_pb2 as tk
from taskserve.protocol.generated.taskserve.v1 import token_classification_pb2_grpc as tk_grpc

TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital and most populous city of France.",
    "I love this movie!",
    "Stock markets fell sharply on Monday after the central bank raised interest rates.",
]
CONTEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "A man is playing a guitar on a small stage in the park. "
    "Stock markets fell sharply on Monday after the central bank raised interest rates. "
    "The cat sat on the mat. "
    "Paris is the capital and most populous city of France."
)


def _pipeline(task: str, source: Path, **kwargs: Any) -> Any:
    from transformers import pipeline

    return pipeline(task, model=str(source), tokenizer=str(source), device="cpu", **kwargs)


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()  # type: ignore[no-any-return]


# -- TextClassification ---------------------------------------------------------------


def test_classify_matches_pipeline(channel: grpc.Channel, tiny_sources: dict[str, Path]) -> None:
    stub = tc_grpc.TextClassificationStub(channel)
    reply = stub.Classify(
        tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-textcls"), texts=TEXTS), timeout=30
    )
    assert (reply.model.name, reply.model.version) == ("tiny-textcls", "1")
    expected = _pipeline("text-classification", tiny_sources["tiny-textcls"], top_k=None)(TEXTS)
    assert len(reply.results) == len(TEXTS)
    for got, want in zip(reply.results, expected, strict=True):
        assert [ls.label for ls in got.labels] == [w["label"] for w in want]
        assert [ls.score for ls in got.labels] == pytest.approx([w["score"] for w in want], abs=1e-4)
        assert sum(ls.score for ls in got.labels) == pytest.approx(1.0, abs=1e-5)
    top = stub.Classify(
        tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-textcls"), texts=TEXTS[:1], top_k=1)
    )
    assert [ls.label for ls in top.results[0].labels] == [expected[0][0]["label"]]


def test_classify_batch_equals_one_by_one(channel: grpc.Channel) -> None:
    stub = tc_grpc.TextClassificationStub(channel)
    ref = common.ModelRef(name="tiny-textcls")
    batched = stub.Classify(tc.ClassifyTextRequest(model=ref, texts=TEXTS)).results
    for text, together in zip(TEXTS, batched, strict=True):
        alone = stub.Classify(tc.ClassifyTextRequest(model=ref, texts=[text])).results[0]
        assert [ls.label for ls in alone.labels] == [ls.label for ls in together.labels]
        assert [ls.score for ls in alone.labels] == pytest.approx(
            [ls.score for ls in together.labels], abs=1e-5
        )


def test_classify_input_errors(channel: grpc.Channel) -> None:
    stub = tc_grpc.TextClassificationStub(channel)
    ref = common.ModelRef(name="tiny-textcls")
    cases = [
        (tc.ClassifyTextRequest(model=ref), grpc.StatusCode.INVALID_ARGUMENT, "none"),
        (
            tc.ClassifyTextRequest(model=ref, texts=["ok", ""]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "texts[1] is empty",
        ),
        (
            tc.ClassifyTextRequest(model=ref, texts=["a"] * 257),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit of 256",
        ),
        (
            tc.ClassifyTextRequest(model=ref, texts=[CONTEXT * 2]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "over the 64 tokens",
        ),
        (tc.ClassifyTextRequest(texts=["a"]), grpc.StatusCode.INVALID_ARGUMENT, "model.name is empty"),
        (
            tc.ClassifyTextRequest(model=common.ModelRef(name="nope"), texts=["a"]),
            grpc.StatusCode.NOT_FOUND,
            "nope",
        ),
        (
            tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-textcls", version="7"), texts=["a"]),
            grpc.StatusCode.NOT_FOUND,
            "no version '7'",
        ),
        (
            tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-ner"), texts=["a"]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "serves task 'token-classification'",
        ),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(request, timeout=30)
        assert _code(err) == code, request
        assert message in err.value.details()
    # The same long text is accepted once the caller asks for truncation.
    reply = stub.Classify(tc.ClassifyTextRequest(model=ref, texts=[CONTEXT * 2], truncate=True))
    assert len(reply.results[0].labels) == 3


# -- TokenClassification ----------------------------------------------------------------


def _entities(reply: tk.TagResponse) -> list[list[tuple[str, int, int, str]]]:
    return [[(e.label, e.start, e.end, e.text) for e in r.entities] for r in reply.results]


def _scores(reply: tk.TagResponse) -> list[float]:
    return [e.score for r in reply.results for e in r.entities]


@pytest.mark.parametrize(
    ("strategy", "name"),
    [
        (tk.AGGREGATION_STRATEGY_FIRST, "first"),
        (tk.AGGREGATION_STRATEGY_AVERAGE, "average"),
        (tk.AGGREGATION_STRATEGY_MAX, "max"),
        (tk.AGGREGATION_STRATEGY_NONE, "none"),
    ],
)
def test_tag_matches_pipeline(
    channel: grpc.Channel, tiny_sources: dict[str, Path], strategy: int, name: str
) -> None:
    stub = tk_grpc.TokenClassificationStub(channel)
    reply = stub.Tag(tk.TagRequest(model=common.ModelRef(name="tiny-ner"), texts=TEXTS, aggregation=strategy))
    nlp = _pipeline("token-classification", tiny_sources["tiny-ner"], aggregation_strategy=name)
    for text, got, want in zip(TEXTS, reply.results, nlp(TEXTS), strict=True):
        key = "entity" if name == "none" else "entity_group"
        assert [(e.label, e.start, e.end) for e in got.entities] == [
            (w[key], w["start"], w["end"]) for w in want
        ]
        assert [e.score for e in got.entities] == pytest.approx([w["score"] for w in want], abs=1e-4)
        assert all(e.text == text[e.start : e.end] for e in got.entities)


def test_tag_batch_equals_one_by_one_and_offsets(channel: grpc.Channel) -> None:
    stub = tk_grpc.TokenClassificationStub(channel)
    ref = common.ModelRef(name="tiny-ner")
    # Ignoring no label makes every word an entity: offsets then cover each word.
    together = stub.Tag(tk.TagRequest(model=ref, texts=TEXTS, ignore_labels=["-"]))
    alone = [stub.Tag(tk.TagRequest(model=ref, texts=[t], ignore_labels=["-"])) for t in TEXTS]
    batched = _entities(together)
    assert batched == [_entities(reply)[0] for reply in alone]
    assert _scores(together) == pytest.approx([s for reply in alone for s in _scores(reply)], abs=1e-5)
    # Entities tile the text: every non-space character belongs to exactly one.
    assert "".join(e[3] for e in batched[0]).replace(" ", "") == "".join(TEXTS[0].split())


# -- FillMask -------------------------------------------------------------------------------


def test_fill_mask_matches_pipeline(channel: grpc.Channel, tiny_sources: dict[str, Path]) -> None:
    stub = fm_grpc.FillMaskStub(channel)
    texts = ["The cat sat on the [MASK].", "Paris is the [MASK] of [MASK]."]
    reply = stub.Fill(fm.FillMaskRequest(model=common.ModelRef(name="tiny-mlm"), texts=texts, top_k=3))
    nlp = _pipeline("fill-mask", tiny_sources["tiny-mlm"], top_k=3)
    one = reply.results[0].masks
    assert len(one) == 1 and one[0].start == texts[0].index("[MASK]")
    want = nlp(texts[0])
    assert [c.token_id for c in one[0].completions] == [w["token"] for w in want]
    assert [c.score for c in one[0].completions] == pytest.approx([w["score"] for w in want], abs=1e-4)
    for c in one[0].completions:
        assert c.sequence == texts[0].replace("[MASK]", c.token)
    two = reply.results[1].masks
    assert [m.start for m in two] == [texts[1].index("[MASK]"), texts[1].rindex("[MASK]")] and all(
        len(m.completions) == 3 for m in two
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.Fill(fm.FillMaskRequest(model=common.ModelRef(name="tiny-mlm"), texts=["no mask"]))
    assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and "[MASK]" in err.value.details()


# -- QuestionAnswering ----------------------------------------------------------------------


def _reference_answers(
    source: Path, question: str, context: str, stride: int, top_k: int
) -> tuple[list[tuple[int, int, float]], int]:
    """Brute force over the PyTorch model: every window (Hugging Face tokenizer, 64 tokens,
    ``stride`` overlap), every context span of <= 30 tokens widened to whole words,
    probability = softmax(start)[s] * softmax(end)[e] over context tokens and [CLS]."""
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForQuestionAnswering.from_pretrained(source).eval()
    enc = tokenizer(question, context, truncation="only_second", max_length=64, stride=stride,
                    return_overflowing_tokens=True, padding="longest", return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        out = model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            token_type_ids=enc["token_type_ids"],
        )
    best: dict[tuple[int, int], float] = {}
    for w in range(enc["input_ids"].shape[0]):
        window = enc.encodings[w]
        context_tokens = [t for t, s in enumerate(window.sequence_ids) if s == 1]
        allowed = [0, *context_tokens]
        p_start = torch.softmax(out.start_logits[w, allowed], -1).numpy()
        p_end = torch.softmax(out.end_logits[w, allowed], -1).numpy()
        for i, s in enumerate(context_tokens, start=1):
            for j, e in enumerate(context_tokens, start=1):
                if s <= e < s + 30:
                    span = (
                        window.word_to_chars(window.token_to_word(s), 1)[0],
                        window.word_to_chars(window.token_to_word(e), 1)[1],
                    )
                    best[span] = max(best.get(span, 0.0), float(p_start[i] * p_end[j]))
    ranked = sorted(best.items(), key=lambda kv: -kv[1])[:top_k]
    return [(a, b, score) for (a, b), score in ranked], int(enc["input_ids"].shape[0])


def test_answer_long_context_reads_every_window(channel: grpc.Channel, tiny_sources: dict[str, Path]) -> None:
    stub = qa_grpc.QuestionAnsweringStub(channel)
    questions = ["What is the capital of France?", "Where did the cat sit?"]
    request = qa.AnswerRequest(
        model=common.ModelRef(name="tiny-qa"),
        items=[qa.QuestionContext(question=q, context=CONTEXT) for q in questions],
        top_k=3,
        doc_stride=16,
    )
    reply = stub.Answer(request)
    for question, got in zip(questions, reply.results, strict=True):
        want, windows = _reference_answers(tiny_sources["tiny-qa"], question, CONTEXT, 16, 3)
        # The context is longer than the model's 64 tokens: it is read in windows, not cut.
        assert windows >= 2
        assert [(a.start, a.end) for a in got.answers] == [(s, e) for s, e, _ in want]
        assert [a.score for a in got.answers] == pytest.approx([p for _, _, p in want], rel=1e-3)
        assert all(a.text == CONTEXT[a.start : a.end] for a in got.answers)


def test_answer_batch_equals_one_by_one_and_errors(channel: grpc.Channel) -> None:
    stub = qa_grpc.QuestionAnsweringStub(channel)
    ref = common.ModelRef(name="tiny-qa")
    items = [
        qa.QuestionContext(question="What fell on Monday?", context=TEXTS[3]),
        qa.QuestionContext(question="Where did the cat sit?", context=CONTEXT),
    ]
    batched = stub.Answer(qa.AnswerRequest(model=ref, items=items, top_k=3)).results
    for item, together in zip(items, batched, strict=True):
        alone = stub.Answer(qa.AnswerRequest(model=ref, items=[item], top_k=3)).results[0]
        assert [(a.start, a.end) for a in alone.answers] == [(a.start, a.end) for a in together.answers]
        assert [a.score for a in alone.answers] == pytest.approx(
            [a.score for a in together.answers], abs=1e-5
        )
    for bad, message in [
        (qa.QuestionContext(question="", context="x"), "items[0].question is empty"),
        (qa.QuestionContext(question="why " * 80, context="x"), "question is too long"),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            stub.Answer(qa.AnswerRequest(model=ref, items=[bad]))
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and message in err.value.details()


# -- SentenceEmbedding on a tiny model (the real one is in test_real_models.py) -----------------


def test_embed_shapes_normalization_and_batching(channel: grpc.Channel) -> None:
    stub = se_grpc.SentenceEmbeddingStub(channel)
    ref = common.ModelRef(name="tiny-embed")
    reply = stub.Embed(se.EmbedRequest(model=ref, texts=TEXTS, normalize=True))
    assert reply.dimension == 32 and len(reply.embeddings) == len(TEXTS)
    vectors = np.array([e.values for e in reply.embeddings])
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(len(TEXTS)), abs=1e-5)
    raw = np.array([e.values for e in stub.Embed(se.EmbedRequest(model=ref, texts=TEXTS[:1])).embeddings])
    # The exporter's default for raw token-state models is normalize: false.
    assert np.linalg.norm(raw[0]) != pytest.approx(1.0, abs=1e-3)
    assert raw[0] / np.linalg.norm(raw[0]) == pytest.approx(vectors[0], abs=1e-5)
    single = [
        stub.Embed(se.EmbedRequest(model=ref, texts=[t], normalize=True)).embeddings[0].values for t in TEXTS
    ]
    assert np.array(single) == pytest.approx(vectors, abs=1e-5)
    similarity = se_grpc.SentenceSimilarityStub(channel)
    scores = similarity.Compare(
        se.CompareSentencesRequest(model=ref, source=TEXTS[0], candidates=TEXTS)
    ).scores
    assert list(scores) == pytest.approx(list(vectors @ vectors[0]), abs=1e-5)
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
