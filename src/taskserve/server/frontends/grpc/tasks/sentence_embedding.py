"""``taskserve.v1.SentenceEmbedding`` and ``taskserve.v1.SentenceSimilarity``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, optional_bool
from taskserve.server.tasks.sentence_embedding import EmbedParams, SentenceEmbedder


class SentenceEmbeddingServicer(TaskServicer, pb_grpc.SentenceEmbeddingServicer):
    @unary
    async def Embed(self, request: pb.EmbedRequest, context: Context) -> pb.EmbedResponse:
        params = EmbedParams(
            normalize=optional_bool(request, "normalize"), truncate=optional_bool(request, "truncate")
        )
        async with self.call(request.model, SentenceEmbedder, request.options, context) as call:
            vectors = await call.task.embed(list(request.texts), params, call.options)
            return pb.EmbedResponse(
                model=call.served_by,
                dimension=vectors.shape[1],
                embeddings=[pb.Embedding(values=row.tolist()) for row in vectors],
            )


class SentenceSimilarityServicer(TaskServicer, pb_grpc.SentenceSimilarityServicer):
    @unary
    async def Compare(
        self, request: pb.CompareSentencesRequest, context: Context
    ) -> pb.CompareSentencesResponse:
        async with self.call(request.model, SentenceEmbedder, request.options, context) as call:
            scores = await call.task.compare(
                request.source, list(request.candidates), optional_bool(request, "truncate"), call.options
            )
            return pb.CompareSentencesResponse(model=call.served_by, scores=scores.tolist())
