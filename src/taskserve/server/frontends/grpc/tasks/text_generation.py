"""``taskserve.v1.TextGeneration``: a server-streaming RPC, one message per text chunk."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TypeVar

from taskserve.protocol.generated.taskserve.v1 import common_pb2, text_transform_pb2
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import server_stream
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.decoding import Sampling
from taskserve.server.tasks.text_generation import FinishReason, GenerateParams, GenerationChunk, TextGenerator

# Generation and the transform services stream the same chunks (see chunk_response).
FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
}


def generate_params(fields: pb.GenerateRequest | text_transform_pb2.DecodingOptions) -> GenerateParams:
    """The decoding settings; a generate request and the transforms' DecodingOptions name them
    alike (the penalties are the generate request's only)."""
    repetition, presence, frequency = 1.0, 0.0, 0.0
    if isinstance(fields, pb.GenerateRequest):
        repetition = fields.repetition_penalty or 1.0
        presence, frequency = fields.presence_penalty, fields.frequency_penalty
    return GenerateParams(
        max_new_tokens=fields.max_new_tokens,
        sampling=Sampling(
            temperature=fields.temperature,
            top_k=fields.top_k,
            top_p=fields.top_p or 1.0,
            seed=fields.seed if fields.HasField("seed") else None,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
        ),
        stop=tuple(fields.stop),
    )


# The streamed messages of generation and of the transforms have the same fields.
_Response = TypeVar("_Response", pb.GenerateResponse, text_transform_pb2.TransformResponse)


def chunk_response(cls: type[_Response], served_by: common_pb2.ServedBy, chunk: GenerationChunk) -> _Response:
    response = cls(
        model=served_by, text=chunk.text, token_ids=chunk.token_ids, finish_reason=FINISH_REASONS[chunk.finish_reason]
    )
    if chunk.usage is not None:
        response.usage.prompt_tokens = chunk.usage.prompt_tokens
        response.usage.generated_tokens = chunk.usage.generated_tokens
    return response


class TextGenerationServicer(TaskServicer, pb_grpc.TextGenerationServicer):
    @server_stream
    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        params = generate_params(request)
        messages = [ChatMessage(m.role, m.content) for m in request.messages]
        async with self.call(request.model, TextGenerator, request.options, context) as call:
            async for chunk in call.task.generate(request.prompt, messages, params, call.options):
                yield chunk_response(pb.GenerateResponse, call.served_by, chunk)
