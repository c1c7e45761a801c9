"""In-test gRPC servers for the client tests: a small v2 servicer and typed task servicers.

They run on their own event loop in a background thread, so blocking clients in
the test thread and asyncio clients on the test loop can both call them.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self

import grpc
import grpc.aio
import numpy as np

from taskserve.protocol.datatypes import numpy_dtype
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import (
    common_pb2,
    fill_mask_pb2,
    fill_mask_pb2_grpc,
    image_classification_pb2,
    image_classification_pb2_grpc,
    image_segmentation_pb2,
    image_segmentation_pb2_grpc,
    image_text_match_pb2,
    image_text_match_pb2_grpc,
    object_detection_pb2,
    object_detection_pb2_grpc,
    question_answering_pb2,
    question_answering_pb2_grpc,
    sentence_embedding_pb2,
    sentence_embedding_pb2_grpc,
    text_classification_pb2,
    text_classification_pb2_grpc,
    token_classification_pb2,
    token_classification_pb2_grpc,
)


@dataclass
class Recorder:
    """What the fake servers saw, for assertions."""

    requests: list[Any] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    infer_attempts: int = 0
    # ModelInfer answers UNAVAILABLE this many times before succeeding.
    fail_first: int = 0
    # What ServerReady answers.
    ready: bool = True

    def record(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.requests.append(request)
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})


def _served(ref: common_pb2.ModelRef) -> common_pb2.ServedBy:
    return common_pb2.ServedBy(name=ref.name, version=ref.version or "1")


class FakeV2(pb_grpc.GRPCInferenceServiceServicer):
    """Serves model "echo" (outputs OUT_<name> = its inputs) and "typed-echo" (answers with typed contents)."""

    MODELS = ("echo", "typed-echo")

    def __init__(self, rec: Recorder, server_name: str = "fake") -> None:
        self.rec = rec
        self.server_name = server_name

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.rec.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=self.server_name, version="0.0.1", extensions=["model_repository"])

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        if request.name not in self.MODELS:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        if request.name not in self.MODELS:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.name!r} not found")
        tm = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="fake",
            inputs=[tm(name="x", datatype="FP32", shape=[-1, 4])],
            outputs=[tm(name="OUT_x", datatype="FP32", shape=[-1, 4])],
        )  # fmt: skip

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        self.rec.record(request, context)
        self.rec.infer_attempts += 1
        if self.rec.infer_attempts <= self.rec.fail_first:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if request.model_name == "slow":
            await asyncio.sleep(5)
        if request.model_name.startswith("fail-"):
            code = grpc.StatusCode[request.model_name.removeprefix("fail-")]
            await context.abort(code, f"failed on purpose with {code.name}")
        if request.model_name not in self.MODELS:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model {request.model_name!r} not found")
        wanted = {o.name for o in request.outputs}
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            name = f"OUT_{tensor.name}"
            if wanted and name not in wanted:
                continue
            out = response.outputs.add(name=name, datatype=tensor.datatype, shape=tensor.shape)
            if request.model_name == "typed-echo":
                _fill_typed(out, tensor.datatype, raw)
            else:
                response.raw_output_contents.append(raw)
        return response


def _fill_typed(out: pb.ModelInferResponse.InferOutputTensor, datatype: str, raw: bytes) -> None:
    values = np.frombuffer(raw, dtype=numpy_dtype(datatype))
    if datatype == "FP32":
        out.contents.fp32_contents.extend(values.tolist())
    elif datatype == "INT64":
        out.contents.int64_contents.extend(values.tolist())
    elif datatype in ("INT32", "INT16", "INT8"):
        out.contents.int_contents.extend(values.tolist())
    else:
        raise NotImplementedError(datatype)


class FakeText(
    text_classification_pb2_grpc.TextClassificationServicer,
):
    """TextClassification: label "long" when a text has more than 3 words, else "short"."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Classify(self, request: Any, context: Any) -> text_classification_pb2.ClassifyTextResponse:
        self.rec.record(request, context)
        results = []
        for text in request.texts:
            long = len(text.split()) > 3
            labels = [
                common_pb2.LabelScore(label="long" if long else "short", score=0.9, index=int(long)),
                common_pb2.LabelScore(label="short" if long else "long", score=0.1, index=int(not long)),
            ]
            results.append(common_pb2.Classification(labels=labels[: request.top_k or 2]))
        return text_classification_pb2.ClassifyTextResponse(model=_served(request.model), results=results)


class FakeTokens(token_classification_pb2_grpc.TokenClassificationServicer):
    """Tags every capitalised word as PER."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Tag(self, request: Any, context: Any) -> token_classification_pb2.TagResponse:
        self.rec.record(request, context)
        results = []
        for text in request.texts:
            entities, pos = [], 0
            for word in text.split(" "):
                if word[:1].isupper():
                    entities.append(token_classification_pb2.Entity(
                        label="PER", score=0.8, start=pos, end=pos + len(word), text=word))  # fmt: skip
                pos += len(word) + 1
            results.append(token_classification_pb2.TaggedText(entities=entities))
        return token_classification_pb2.TagResponse(model=_served(request.model), results=results)


def _vector(text: str) -> list[float]:
    return [float(len(text)), float(text.count(" ")), 1.0]


class FakeEmbedding(sentence_embedding_pb2_grpc.SentenceEmbeddingServicer):
    """Embeds a text as [characters, spaces, 1]."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Embed(self, request: Any, context: Any) -> sentence_embedding_pb2.EmbedResponse:
        self.rec.record(request, context)
        if not request.texts:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "texts must not be empty")
        embs = [sentence_embedding_pb2.Embedding(values=_vector(t)) for t in request.texts]
        return sentence_embedding_pb2.EmbedResponse(model=_served(request.model), dimension=3, embeddings=embs)


class FakeSimilarity(sentence_embedding_pb2_grpc.SentenceSimilarityServicer):
    """Scores a candidate by 1 / (1 + |length difference|)."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Compare(self, request: Any, context: Any) -> sentence_embedding_pb2.CompareSentencesResponse:
        self.rec.record(request, context)
        scores = [1.0 / (1 + abs(len(request.source) - len(c))) for c in request.candidates]
        return sentence_embedding_pb2.CompareSentencesResponse(model=_served(request.model), scores=scores)


class FakeQA(question_answering_pb2_grpc.QuestionAnsweringServicer):
    """Answers with the context's last word."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Answer(self, request: Any, context: Any) -> question_answering_pb2.AnswerResponse:
        self.rec.record(request, context)
        results = []
        for item in request.items:
            start = item.context.rfind(" ") + 1
            span = question_answering_pb2.AnswerSpan(
                text=item.context[start:], score=0.5, start=start, end=len(item.context))  # fmt: skip
            results.append(question_answering_pb2.Answers(answers=[span]))
        return question_answering_pb2.AnswerResponse(model=_served(request.model), results=results)


class FakeFillMask(fill_mask_pb2_grpc.FillMaskServicer):
    """Fills every [MASK] with "paris"."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Fill(self, request: Any, context: Any) -> fill_mask_pb2.FillMaskResponse:
        self.rec.record(request, context)
        results = []
        for text in request.texts:
            start = text.find("[MASK]")
            comp = fill_mask_pb2.MaskCompletion(
                token="paris", token_id=42, score=0.7, sequence=text.replace("[MASK]", "paris", 1))  # fmt: skip
            results.append(
                fill_mask_pb2.FilledText(masks=[fill_mask_pb2.MaskPrediction(start=start, completions=[comp])])
            )
        return fill_mask_pb2.FillMaskResponse(model=_served(request.model), results=results)


def _image_size(image: common_pb2.Image) -> tuple[int, int, int]:
    """(height, width, mean pixel) of a raw image; (0, 0, len) for encoded bytes."""
    if image.WhichOneof("source") == "raw":
        data = np.frombuffer(image.raw.data, dtype=np.uint8)
        return image.raw.height, image.raw.width, int(data.mean()) if data.size else 0
    return 0, 0, len(image.encoded)


class FakeVision(
    image_classification_pb2_grpc.ImageClassificationServicer,
):
    """Classifies an image as "bright" when its mean pixel is over 127, else "dark"."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Classify(self, request: Any, context: Any) -> image_classification_pb2.ClassifyImageResponse:
        self.rec.record(request, context)
        results = []
        for img in request.images:
            _, _, mean = _image_size(img)
            label = "bright" if mean > 127 else "dark"
            results.append(common_pb2.Classification(labels=[common_pb2.LabelScore(label=label, score=1.0, index=0)]))
        return image_classification_pb2.ClassifyImageResponse(model=_served(request.model), results=results)


class FakeDetection(object_detection_pb2_grpc.ObjectDetectionServicer):
    """One box covering the whole image."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Detect(self, request: Any, context: Any) -> object_detection_pb2.DetectResponse:
        self.rec.record(request, context)
        results = []
        for img in request.images:
            h, w, _ = _image_size(img)
            box = object_detection_pb2.BoundingBox(x_min=0, y_min=0, x_max=w, y_max=h)
            det = object_detection_pb2.Detection(label="thing", score=0.9, index=3, box=box)
            results.append(object_detection_pb2.Detections(detections=[det], width=w, height=h))
        return object_detection_pb2.DetectResponse(model=_served(request.model), results=results)


class FakeSegmentation(image_segmentation_pb2_grpc.ImageSegmentationServicer):
    """One segment: the left half of the image."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Segment(self, request: Any, context: Any) -> image_segmentation_pb2.SegmentResponse:
        import io

        from PIL import Image

        self.rec.record(request, context)
        results = []
        for img in request.images:
            h, w, _ = _image_size(img)
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[:, : w // 2] = 255
            buf = io.BytesIO()
            Image.fromarray(mask, mode="L").save(buf, format="PNG")
            seg = image_segmentation_pb2.Segment(
                label="left", index=1, score=0.6, area=h * (w // 2), mask_png=buf.getvalue())  # fmt: skip
            results.append(image_segmentation_pb2.Segmentation(segments=[seg], width=w, height=h))
        return image_segmentation_pb2.SegmentResponse(model=_served(request.model), results=results)


class FakeMatch(image_text_match_pb2_grpc.ImageTextMatchServicer):
    """Similarity of image i to caption j is (i + 1) * (j + 1) / 10."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    async def Compare(self, request: Any, context: Any) -> image_text_match_pb2.CompareImageTextResponse:
        self.rec.record(request, context)
        results = []
        n = len(request.captions)
        for i in range(len(request.images)):
            sims = [(i + 1) * (j + 1) / 10 for j in range(n)]
            results.append(image_text_match_pb2.ImageTextScores(similarities=sims, probabilities=[1.0 / n] * n))
        return image_text_match_pb2.CompareImageTextResponse(model=_served(request.model), results=results)


Registrar = Callable[[grpc.aio.Server, Recorder], None]


def add_all_fakes(server: grpc.aio.Server, rec: Recorder) -> None:
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(FakeV2(rec), server)
    text_classification_pb2_grpc.add_TextClassificationServicer_to_server(FakeText(rec), server)
    token_classification_pb2_grpc.add_TokenClassificationServicer_to_server(FakeTokens(rec), server)
    sentence_embedding_pb2_grpc.add_SentenceEmbeddingServicer_to_server(FakeEmbedding(rec), server)
    sentence_embedding_pb2_grpc.add_SentenceSimilarityServicer_to_server(FakeSimilarity(rec), server)
    question_answering_pb2_grpc.add_QuestionAnsweringServicer_to_server(FakeQA(rec), server)
    fill_mask_pb2_grpc.add_FillMaskServicer_to_server(FakeFillMask(rec), server)
    image_classification_pb2_grpc.add_ImageClassificationServicer_to_server(FakeVision(rec), server)
    object_detection_pb2_grpc.add_ObjectDetectionServicer_to_server(FakeDetection(rec), server)
    image_segmentation_pb2_grpc.add_ImageSegmentationServicer_to_server(FakeSegmentation(rec), server)
    image_text_match_pb2_grpc.add_ImageTextMatchServicer_to_server(FakeMatch(rec), server)


class ServerThread:
    """A grpc.aio server on 127.0.0.1, port chosen by the OS, running on its own loop thread."""

    def __init__(
        self,
        register: Registrar = add_all_fakes,
        credentials: grpc.ServerCredentials | None = None,
        options: list[tuple[str, Any]] | None = None,
    ) -> None:
        self.rec = Recorder()
        self._register = register
        self._credentials = credentials
        self._options = options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> int:
        self._server = grpc.aio.server(options=self._options)
        self._register(self._server, self.rec)
        if self._credentials is not None:
            port = self._server.add_secure_port("127.0.0.1:0", self._credentials)
        else:
            port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return port

    def start(self) -> ServerThread:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
