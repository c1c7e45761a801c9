"""``client.text``: the typed text services, one method per task.

Every method takes the model by keyword (``model=``, optional ``version=``),
the batcher hints ``priority`` (1 highest, 0 the model's default) and
``queue_timeout_us``, and ``timeout`` (the call's deadline in seconds; the
client's default when None).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc.aio
import numpy as np
import numpy.typing as npt

from taskserve.clients import generation_codec as gen_codec
from taskserve.clients import text_codec as codec
from taskserve.clients import transform_codec as tx
from taskserve.clients._async.calls import AsyncCaller
from taskserve.clients.generation_codec import Message
from taskserve.clients.results import AnswerSpan, Classification, Entity, Generation, GenerationChunk, MaskPrediction
from taskserve.clients.text_codec import Aggregation, ScoreFunction, model_ref, request_options
from taskserve.protocol.generated.taskserve.v1 import (
    fill_mask_pb2_grpc,
    question_answering_pb2_grpc,
    sentence_embedding_pb2_grpc,
    text_classification_pb2_grpc,
    text_generation_pb2_grpc,
    text_transform_pb2,
    text_transform_pb2_grpc,
    token_classification_pb2_grpc,
)


class AsyncTextNamespace:
    """asyncio text tasks."""

    def __init__(self, channel: grpc.aio.Channel, caller: AsyncCaller) -> None:
        self._caller = caller
        self._classification = text_classification_pb2_grpc.TextClassificationStub(channel)
        self._tokens = token_classification_pb2_grpc.TokenClassificationStub(channel)
        self._embedding = sentence_embedding_pb2_grpc.SentenceEmbeddingStub(channel)
        self._similarity = sentence_embedding_pb2_grpc.SentenceSimilarityStub(channel)
        self._qa = question_answering_pb2_grpc.QuestionAnsweringStub(channel)
        self._fill_mask = fill_mask_pb2_grpc.FillMaskStub(channel)
        self._generation = text_generation_pb2_grpc.TextGenerationStub(channel)
        self._translation = text_transform_pb2_grpc.TranslationStub(channel)
        self._summarization = text_transform_pb2_grpc.SummarizationStub(channel)
        self._text2text = text_transform_pb2_grpc.Text2TextStub(channel)

    async def classify(
        self, texts: Sequence[str], *, model: str, version: str = "", top_k: int = 0,
        function: ScoreFunction | None = None, truncate: bool | None = None,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[Classification]:  # fmt: skip
        """Labels for each text, best first (``top_k`` 0: the model's default)."""
        req = codec.classify_request(
            model_ref(model, version),
            request_options(priority, queue_timeout_us),
            texts,
            top_k,
            function,
            truncate,
        )
        return codec.classifications((await self._caller.unary(self._classification.Classify, req, timeout)).results)

    async def tag(
        self, texts: Sequence[str], *, model: str, version: str = "", aggregation: Aggregation | None = None,
        ignore_labels: Sequence[str] = (), truncate: bool | None = None,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[tuple[Entity, ...]]:  # fmt: skip
        """Entities of each text, in text order, with character offsets."""
        req = codec.tag_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), texts, aggregation,
            ignore_labels, truncate,
        )  # fmt: skip
        return codec.tagged(await self._caller.unary(self._tokens.Tag, req, timeout))

    async def embed(
        self, texts: Sequence[str], *, model: str, version: str = "", normalize: bool | None = None,
        truncate: bool | None = None, priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:  # fmt: skip
        """An (n_texts, dimension) float32 array of sentence embeddings."""
        req = codec.embed_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), texts, normalize, truncate
        )
        return codec.embeddings(await self._caller.unary(self._embedding.Embed, req, timeout))

    async def compare(
        self, source: str, candidates: Sequence[str], *, model: str, version: str = "", truncate: bool | None = None,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> npt.NDArray[np.float32]:  # fmt: skip
        """Cosine similarity of ``source`` to each candidate, in candidate order."""
        req = codec.compare_request(
            model_ref(model, version),
            request_options(priority, queue_timeout_us),
            source,
            candidates,
            truncate,
        )
        return codec.similarity_scores(await self._caller.unary(self._similarity.Compare, req, timeout))

    async def answer(
        self, items: Sequence[tuple[str, str]], *, model: str, version: str = "", top_k: int = 0,
        max_answer_length: int = 0, doc_stride: int = 0, allow_no_answer: bool = False,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[tuple[AnswerSpan, ...]]:  # fmt: skip
        """Best answer spans for each (question, context) pair."""
        req = codec.answer_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), items, top_k,
            max_answer_length, doc_stride, allow_no_answer,
        )  # fmt: skip
        return codec.answers(await self._caller.unary(self._qa.Answer, req, timeout))

    async def fill_mask(
        self, texts: Sequence[str], *, model: str, version: str = "", top_k: int = 0, truncate: bool | None = None,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[tuple[MaskPrediction, ...]]:  # fmt: skip
        """Completions for every mask token of each text."""
        req = codec.fill_mask_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), texts, top_k, truncate
        )
        return codec.filled(await self._caller.unary(self._fill_mask.Fill, req, timeout))

    def generate(
        self, prompt: str | None = None, *, model: str, messages: Sequence[Message] | None = None,
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (), version: str = "",
        repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:  # fmt: skip
        """Stream the continuation of ``prompt`` (or the reply to chat ``messages``) chunk by chunk.

        ``async for chunk in client.text.generate(...)``; the arguments are checked at the call.
        ``temperature`` 0 is greedy; ``timeout`` bounds the whole stream. Stopping the
        iteration early (``break``, closing the iterator) cancels the generation on the server."""
        req = gen_codec.generate_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), prompt, messages,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
            repetition_penalty, presence_penalty, frequency_penalty,
        )  # fmt: skip
        return self._caller.streamed(self._generation.Generate, req, timeout, gen_codec.chunk)

    async def generate_text(
        self, prompt: str | None = None, *, model: str, messages: Sequence[Message] | None = None,
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (), version: str = "",
        repetition_penalty: float = 1.0, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> Generation:  # fmt: skip
        """The whole generation at once: text, token ids, finish reason and usage."""
        collector = gen_codec.GenerationCollector()
        async for piece in self.generate(
            prompt, model=model, messages=messages, max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop=stop, version=version, priority=priority,
            queue_timeout_us=queue_timeout_us, timeout=timeout, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        ):  # fmt: skip
            collector.add(piece)
        return collector.result()

    # -- transforms: translate, summarize, text2text; each whole (unary) or streamed --------

    async def translate(
        self, text: str, *, model: str, target_language: str, source_language: str = "", version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> Generation:  # fmt: skip
        """``text`` in ``target_language`` (languages as the model names them)."""
        req = tx.request(
            text_transform_pb2.TranslateRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
            source_language=source_language, target_language=target_language,
        )  # fmt: skip
        return tx.transform_result(await self._caller.unary(self._translation.Translate, req, timeout))

    def translate_stream(
        self, text: str, *, model: str, target_language: str, source_language: str = "", version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:  # fmt: skip
        req = tx.request(
            text_transform_pb2.TranslateRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
            source_language=source_language, target_language=target_language,
        )  # fmt: skip
        return self._caller.streamed(self._translation.TranslateStream, req, timeout, gen_codec.chunk)

    async def summarize(
        self, text: str, *, model: str, version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> Generation:  # fmt: skip
        req = tx.request(
            text_transform_pb2.SummarizeRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
        )  # fmt: skip
        return tx.transform_result(await self._caller.unary(self._summarization.Summarize, req, timeout))

    def summarize_stream(
        self, text: str, *, model: str, version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:  # fmt: skip
        req = tx.request(
            text_transform_pb2.SummarizeRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
        )  # fmt: skip
        return self._caller.streamed(self._summarization.SummarizeStream, req, timeout, gen_codec.chunk)

    async def text2text(
        self, text: str, *, model: str, version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> Generation:  # fmt: skip
        req = tx.request(
            text_transform_pb2.Text2TextRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
        )  # fmt: skip
        return tx.transform_result(await self._caller.unary(self._text2text.Generate, req, timeout))

    def text2text_stream(
        self, text: str, *, model: str, version: str = "",
        max_new_tokens: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
        seed: int | None = None, stop: Sequence[str] = (),
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> AsyncIterator[GenerationChunk]:  # fmt: skip
        req = tx.request(
            text_transform_pb2.Text2TextRequest, text, model, version, priority, queue_timeout_us,
            max_new_tokens, temperature, top_k, top_p, seed, stop,
        )  # fmt: skip
        return self._caller.streamed(self._text2text.GenerateStream, req, timeout, gen_codec.chunk)
