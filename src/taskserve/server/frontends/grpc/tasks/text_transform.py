"""``taskserve.v1.Translation``, ``Summarization`` and ``Text2Text``: a unary and a
server-streaming RPC each, on an encoder-decoder model or a decoder with prompt templates."""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator
from typing import Any

from taskserve.protocol.generated.taskserve.v1 import common_pb2
from taskserve.protocol.generated.taskserve.v1 import text_transform_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import text_transform_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import server_stream, unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer
from taskserve.server.frontends.grpc.tasks.text_generation import chunk_response, generate_params
from taskserve.server.serving.manager import ModelManager
from taskserve.server.tasks.base import TaskCache
from taskserve.server.tasks.seq2seq import Seq2SeqGenerator
from taskserve.server.tasks.text_generation import GenerationChunk, TextGenerator
from taskserve.server.tasks.transform import PromptTransforms, TransformInput, TransformKind

_TASKS: tuple[type[TextGenerator] | type[Seq2SeqGenerator], ...] = (Seq2SeqGenerator, TextGenerator)


def _joined(served_by: common_pb2.ServedBy, chunks: list[GenerationChunk]) -> pb.TransformResponse:
    last = chunks[-1]
    ids = tuple(i for c in chunks for i in c.token_ids)
    return chunk_response(
        pb.TransformResponse,
        served_by,
        GenerationChunk("".join(c.text for c in chunks), ids, last.finish_reason, last.usage),
    )


class _TransformServicer(TaskServicer):
    """Shared by the three services: the model's task object, and its chunks."""

    def __init__(self, models: ModelManager, tasks: TaskCache) -> None:
        super().__init__(models, tasks)
        # One PromptTransforms per TextGenerator (templates parsed once per loaded version).
        self._prompted: weakref.WeakKeyDictionary[TextGenerator, PromptTransforms] = weakref.WeakKeyDictionary()

    async def _generate(
        self, request: Any, kind: TransformKind, context: Context
    ) -> AsyncIterator[tuple[common_pb2.ServedBy, GenerationChunk]]:
        item = TransformInput(
            kind, request.text, getattr(request, "source_language", ""), getattr(request, "target_language", "")
        )
        params = generate_params(request.decoding)
        async with self.call(request.model, _TASKS, request.options, context) as call:
            task = call.task
            if isinstance(task, TextGenerator):
                prompted = self._prompted.get(task)
                if prompted is None:
                    prompted = self._prompted[task] = PromptTransforms(task)
                async for chunk in prompted.transform(item, params, call.options):
                    yield call.served_by, chunk
            else:
                encoder = self._models.get(task.encoder_model)
                with encoder.leases.hold():  # a swap of the encoder entry lets it finish this request
                    async for chunk in task.transform(item, params, call.options, encoder):
                        yield call.served_by, chunk

    async def _stream(self, request: Any, kind: TransformKind, context: Context) -> AsyncIterator[pb.TransformResponse]:
        async for served_by, chunk in self._generate(request, kind, context):
            yield chunk_response(pb.TransformResponse, served_by, chunk)

    async def _whole(self, request: Any, kind: TransformKind, context: Context) -> pb.TransformResponse:
        chunks: list[GenerationChunk] = []
        served_by = common_pb2.ServedBy()
        async for by, chunk in self._generate(request, kind, context):
            served_by = by
            chunks.append(chunk)
        return _joined(served_by, chunks)


class TranslationServicer(_TransformServicer, pb_grpc.TranslationServicer):
    @unary
    async def Translate(self, request: pb.TranslateRequest, context: Context) -> pb.TransformResponse:
        return await self._whole(request, TransformKind.TRANSLATION, context)

    @server_stream
    async def TranslateStream(
        self, request: pb.TranslateRequest, context: Context
    ) -> AsyncIterator[pb.TransformResponse]:
        async for response in self._stream(request, TransformKind.TRANSLATION, context):
            yield response


class SummarizationServicer(_TransformServicer, pb_grpc.SummarizationServicer):
    @unary
    async def Summarize(self, request: pb.SummarizeRequest, context: Context) -> pb.TransformResponse:
        return await self._whole(request, TransformKind.SUMMARIZATION, context)

    @server_stream
    async def SummarizeStream(
        self, request: pb.SummarizeRequest, context: Context
    ) -> AsyncIterator[pb.TransformResponse]:
        async for response in self._stream(request, TransformKind.SUMMARIZATION, context):
            yield response


class Text2TextServicer(_TransformServicer, pb_grpc.Text2TextServicer):
    @unary
    async def Generate(self, request: pb.Text2TextRequest, context: Context) -> pb.TransformResponse:
        return await self._whole(request, TransformKind.TEXT2TEXT, context)

    @server_stream
    async def GenerateStream(
        self, request: pb.Text2TextRequest, context: Context
    ) -> AsyncIterator[pb.TransformResponse]:
        async for response in self._stream(request, TransformKind.TEXT2TEXT, context):
            yield response
