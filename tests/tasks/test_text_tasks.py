"""Text task modules against a fake scheduler: tokenization, chunking, post-processing, validation."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from taskserve.server.errors import InvalidInput, WrongTask
from taskserve.server.tasks.base import CallOptions, ScoreFunction, TaskCache, TaskContext, TaskLimits
from taskserve.server.tasks.fill_mask import FillParams, MaskFiller
from taskserve.server.tasks.question_answering import AnswerParams, QAItem, QuestionAnswerer
from taskserve.server.tasks.sentence_embedding import EmbedParams, SentenceEmbedder
from taskserve.server.tasks.text_classification import ClassifyTextParams, TextClassifier
from taskserve.server.tasks.token_classification import Aggregation, TagParams, TokenClassifier
from tests.tasks.fakes import FakeModel, fake_model, wordpiece_tokenizer, write_tokenizer

TOK = wordpiece_tokenizer()
ID = TOK.token_to_id
OPTS = CallOptions()


@pytest.fixture(scope="module")
def context() -> TaskContext:
    ctx = TaskContext(TaskLimits(max_items=16, max_text_chars=2000), workers=2)
    yield ctx
    ctx.close()


def _write_labels(model_dir: Path, labels: list[str]) -> str:
    (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    return "labels.txt"


# -- text classification ---------------------------------------------------------


def _sentiment(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = inputs["input_ids"]
    # Logit per label = 2 * occurrences of a marker word: NEG <- "dog", POS <- "cat".
    logits = np.stack([(ids == ID("dog")).sum(1), (ids == ID("cat")).sum(1)], axis=1).astype(np.float32) * 2
    return {"logits": logits}


def _classifier(tmp_path: Path, context: TaskContext, **config: object) -> tuple[FakeModel, TextClassifier]:
    model_dir = tmp_path / "sentiment"
    write_tokenizer(model_dir)
    labels = _write_labels(model_dir, ["NEG", "POS"])
    model = fake_model(
        model_dir, "text-classification", _sentiment, max_batch_size=2, labels=labels, **config
    )
    return model, TextClassifier.load(model, context)


async def test_classify_ranks_labels_with_softmax(tmp_path: Path, context: TaskContext) -> None:
    model, task = _classifier(tmp_path, context)
    texts = ["the cat sat", "a dog ran", "the cat and the cat", "on a mat", "dog dog cat"]
    results = await task.classify(texts, ClassifyTextParams(), OPTS)
    assert [r[0].label for r in results[:3]] == ["POS", "NEG", "POS"]
    for r in results:
        assert len(r) == 2 and sum(ls.score for ls in r) == pytest.approx(1.0, abs=1e-6)
    assert results[3][0].score == pytest.approx(0.5)
    assert results[2][0].score == pytest.approx(1 / (1 + np.exp(-4)), rel=1e-5)
    # 5 texts, max_batch_size 2: three scheduler requests of <= 2 rows.
    assert [r.inputs["input_ids"].shape[0] for r in model.scheduler.requests] == [2, 2, 1]
    # The tokenizer's attention mask and type ids travel with the ids.
    assert set(model.scheduler.requests[0].inputs) == {"input_ids", "attention_mask", "token_type_ids"}


async def test_classify_top_k_and_sigmoid(tmp_path: Path, context: TaskContext) -> None:
    _, task = _classifier(tmp_path, context, task_options={"problem_type": "multi_label_classification"})
    [result] = await task.classify(["the cat"], ClassifyTextParams(top_k=1), OPTS)
    assert len(result) == 1 and result[0].label == "POS"
    assert result[0].score == pytest.approx(1 / (1 + np.exp(-2)), rel=1e-5)
    [raw] = await task.classify(["the cat"], ClassifyTextParams(function=ScoreFunction.NONE), OPTS)
    assert [(ls.label, ls.score) for ls in raw] == [("POS", 2.0), ("NEG", 0.0)]


async def test_classify_validates_input(tmp_path: Path, context: TaskContext) -> None:
    _, task = _classifier(tmp_path, context, task_options={"max_length": 6})
    with pytest.raises(InvalidInput, match="none"):
        await task.classify([], ClassifyTextParams(), OPTS)
    with pytest.raises(InvalidInput, match=r"texts\[1\] is empty"):
        await task.classify(["cat", "   "], ClassifyTextParams(), OPTS)
    with pytest.raises(InvalidInput, match="17 items exceed the limit of 16"):
        await task.classify(["cat"] * 17, ClassifyTextParams(), OPTS)
    with pytest.raises(InvalidInput, match="characters"):
        await task.classify(["cat " * 600], ClassifyTextParams(), OPTS)
    long_text = "the dog sat on the mat the cat"  # 8 words + 2 special tokens > 6
    with pytest.raises(InvalidInput, match=r"texts\[0\] is 10 tokens long, over the 6 tokens"):
        await task.classify([long_text], ClassifyTextParams(), OPTS)
    # Truncated to 6 tokens: [CLS] the dog sat on [SEP]; the "cat" at the end is cut off.
    [result] = await task.classify([long_text], ClassifyTextParams(truncate=True), OPTS)
    assert result[0].label == "NEG"


async def test_task_cache_checks_the_model_task(tmp_path: Path, context: TaskContext) -> None:
    model, _ = _classifier(tmp_path, context)
    cache = TaskCache(context)
    first = await cache.get(model, TextClassifier)
    assert await cache.get(model, TextClassifier) is first
    with pytest.raises(
        WrongTask, match="serves task 'text-classification'; this service needs a 'fill-mask' model"
    ):
        await cache.get(model, MaskFiller)


# -- token classification -----------------------------------------------------------

NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# token -> (label index, logit); every other token is "O" with logit 5.
NER_TABLE = {
    "john": (1, 5.0),
    "smith": (2, 5.0),
    "new": (3, 5.0),
    "york": (4, 5.0),
    "paris": (3, 5.0),
    "un": (1, 2.0),
}


def _ner(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = inputs["input_ids"]
    logits = np.zeros((*ids.shape, len(NER_LABELS)), np.float32)
    logits[..., 0] = 5.0
    for token, (label, value) in NER_TABLE.items():
        rows, cols = np.nonzero(ids == ID(token))
        logits[rows, cols, 0] = 0.0
        logits[rows, cols, label] = value
    # "##believ" is a confident "O": MAX picks it over the weak "un" -> B-PER.
    rows, cols = np.nonzero(ids == ID("##believ"))
    logits[rows, cols, 0] = 6.0
    return {"logits": logits}


@pytest.fixture()
def tagger(tmp_path: Path, context: TaskContext) -> TokenClassifier:
    model_dir = tmp_path / "ner"
    write_tokenizer(model_dir)
    model = fake_model(model_dir, "token-classification", _ner, labels=_write_labels(model_dir, NER_LABELS))
    return TokenClassifier.load(model, context)


async def test_tag_groups_words_into_entities_with_offsets(tagger: TokenClassifier) -> None:
    text = "John Smith lives in New York, near Paris."
    [entities] = await tagger.tag([text], TagParams(), OPTS)
    assert [(e.label, e.start, e.end, e.text) for e in entities] == [
        ("PER", 0, 10, "John Smith"),
        ("LOC", 20, 28, "New York"),
        ("LOC", 35, 40, "Paris"),
    ]
    assert all(0.9 < e.score <= 1.0 for e in entities)


async def test_tag_without_aggregation_returns_tokens(tagger: TokenClassifier) -> None:
    [entities] = await tagger.tag(["john smith in paris"], TagParams(aggregation=Aggregation.NONE), OPTS)
    assert [(e.label, e.text) for e in entities] == [
        ("B-PER", "john"),
        ("I-PER", "smith"),
        ("B-LOC", "paris"),
    ]
    [with_o] = await tagger.tag(
        ["john in"], TagParams(aggregation=Aggregation.NONE, ignore_labels=("B-PER",)), OPTS
    )
    assert [(e.label, e.text, e.start, e.end) for e in with_o] == [("O", "in", 5, 7)]


async def test_tag_subword_strategies_differ(tagger: TokenClassifier) -> None:
    text = "Unbelievable john"  # un ##believ ##able john
    first, average, maximum = [
        (await tagger.tag([text], TagParams(aggregation=a), OPTS))[0]
        for a in (Aggregation.FIRST, Aggregation.AVERAGE, Aggregation.MAX)
    ]
    # FIRST takes the weak B-PER of "un"; the word then merges with "john" (I- not needed: B starts anew).
    assert [(e.label, e.text) for e in first] == [("PER", "Unbelievable"), ("PER", "john")]
    assert [(e.label, e.text) for e in average] == [("PER", "john")]
    assert [(e.label, e.text) for e in maximum] == [("PER", "john")]


async def test_tag_batch_equals_one_by_one(tagger: TokenClassifier) -> None:
    texts = ["John Smith", "the cat sat in New York with john", "paris"]
    batched = await tagger.tag(texts, TagParams(), OPTS)
    single = [(await tagger.tag([t], TagParams(), OPTS))[0] for t in texts]
    assert batched == single


# -- sentence embedding -----------------------------------------------------------------

_TABLE = np.random.default_rng(0).standard_normal((64, 12)).astype(np.float32)


def _states(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"last_hidden_state": _TABLE[inputs["input_ids"]]}


@pytest.fixture()
def embedder(tmp_path: Path, context: TaskContext) -> SentenceEmbedder:
    model_dir = tmp_path / "embed"
    write_tokenizer(model_dir)
    outputs = [{"name": "last_hidden_state", "datatype": "FP32", "dims": [-1, 12]}]
    model = fake_model(model_dir, "sentence-embedding", _states, max_batch_size=2, outputs=outputs)
    return SentenceEmbedder.load(model, context)


async def test_embed_mean_pools_and_normalizes(embedder: SentenceEmbedder) -> None:
    vectors = await embedder.embed(["the cat", "a dog ran in the park"], EmbedParams(), OPTS)
    assert vectors.shape == (2, 12)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    ids = TOK.encode("the cat").ids
    expected = _TABLE[ids].mean(axis=0)
    assert vectors[0] == pytest.approx(expected / np.linalg.norm(expected), abs=1e-5)
    raw = await embedder.embed(["the cat"], EmbedParams(normalize=False), OPTS)
    assert raw[0] == pytest.approx(expected, abs=1e-5)


async def test_compare_scores_identical_text_highest(embedder: SentenceEmbedder) -> None:
    scores = await embedder.compare("the cat sat", ["a dog ran", "The cat sat", "in the park"], None, OPTS)
    assert scores.shape == (3,)
    assert scores[1] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] > max(scores[0], scores[2])
    with pytest.raises(InvalidInput, match="source is empty"):
        await embedder.compare(" ", ["cat"], None, OPTS)
    with pytest.raises(InvalidInput, match=r"candidates\[0\] is empty"):
        await embedder.compare("cat", [""], None, OPTS)


# -- question answering ----------------------------------------------------------------


def _qa(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = inputs["input_ids"]
    types = inputs["token_type_ids"]
    # The answer span is "new york": start on "new", end on "york", but only in the context.
    start = np.where((ids == ID("new")) & (types == 1), 8.0, 0.0).astype(np.float32)
    end = np.where((ids == ID("york")) & (types == 1), 8.0, 0.0).astype(np.float32)
    return {"start_logits": start, "end_logits": end}


@pytest.fixture()
def answerer(tmp_path: Path, context: TaskContext) -> tuple[FakeModel, QuestionAnswerer]:
    model_dir = tmp_path / "qa"
    write_tokenizer(model_dir)
    model = fake_model(model_dir, "question-answering", _qa, task_options={"max_length": 24})
    return model, QuestionAnswerer.load(model, context)


async def test_answer_finds_span_beyond_the_first_window(
    answerer: tuple[FakeModel, QuestionAnswerer],
) -> None:
    model, task = answerer
    filler = "the cat sat on the mat. " * 6
    context = filler + "John lives in New York city."
    item = QAItem(question="where does john live?", context=context)
    [answers] = await task.answer([item], AnswerParams(doc_stride=4), OPTS)
    best = answers[0]
    assert (best.text, best.start, best.end) == (
        "New York",
        context.index("New York"),
        context.index("New York") + 8,
    )
    assert best.score > 0.9
    # The context needed several windows, each at most 24 tokens.
    rows = sum(r.inputs["input_ids"].shape[0] for r in model.scheduler.requests)
    assert rows > 2 and all(r.inputs["input_ids"].shape[1] <= 24 for r in model.scheduler.requests)


async def test_answer_top_k_no_answer_and_validation(answerer: tuple[FakeModel, QuestionAnswerer]) -> None:
    _, task = answerer
    item = QAItem(question="where?", context="He moved to New York in May.")
    [answers] = await task.answer([item], AnswerParams(top_k=3, allow_no_answer=True), OPTS)
    assert len(answers) == 3 and answers[0].text == "New York"
    assert [a.score for a in answers] == sorted((a.score for a in answers), reverse=True)
    every = (await task.answer([item], AnswerParams(top_k=500, allow_no_answer=True), OPTS))[0]
    assert [(a.start, a.end) for a in every if a.text == ""] == [(0, 0)]
    without = (await task.answer([item], AnswerParams(top_k=500), OPTS))[0]
    assert len(without) == len(every) - 1 and all(a.text for a in without)
    # Every span lies inside the context and spans at most max_answer_length tokens.
    assert all(item.context[a.start : a.end] == a.text for a in without)
    with pytest.raises(InvalidInput, match=r"items\[0\].question is too long"):
        await task.answer([QAItem(question="the cat " * 10, context="paris")], AnswerParams(), OPTS)
    with pytest.raises(InvalidInput, match=r"items\[1\].context is empty"):
        await task.answer([item, QAItem(question="who?", context="")], AnswerParams(), OPTS)


# -- fill-mask -----------------------------------------------------------------------------


def _mlm(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids = inputs["input_ids"]
    vocab = TOK.get_vocab_size()
    logits = np.zeros((*ids.shape, vocab), np.float32)
    logits[..., ID("paris")] = 3.0
    logits[..., ID("capital")] = 2.0
    return {"logits": logits}


async def test_fill_mask_predicts_each_mask(tmp_path: Path, context: TaskContext) -> None:
    model_dir = tmp_path / "mlm"
    write_tokenizer(model_dir)
    task = MaskFiller.load(fake_model(model_dir, "fill-mask", _mlm), context)
    text = "[MASK] is the capital of [MASK]."
    [predictions] = await task.fill([text], FillParams(top_k=2), OPTS)
    assert [p.start for p in predictions] == [0, text.rindex("[MASK]")]
    first = predictions[0].completions
    assert [c.token for c in first] == ["paris", "capital"]
    assert first[0].sequence == "paris is the capital of [MASK]."
    assert first[0].token_id == ID("paris") and 0 < first[1].score < first[0].score < 1
    with pytest.raises(InvalidInput, match=r"texts\[0\] holds no mask token; put '\[MASK\]'"):
        await task.fill(["no mask here"], FillParams(), OPTS)
