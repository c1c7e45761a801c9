"""The typed per-task gRPC services (package ``taskserve.v1``): thin servicers
that decode protobuf, call a task from ``taskserve.server.tasks`` and encode
its answer. They share the models and schedulers of the v2 protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from taskserve.protocol.generated.taskserve.v1 import (
    fill_mask_pb2,
    fill_mask_pb2_grpc,
    image_classification_pb2,
    image_classification_pb2_grpc,
    image_generation_pb2,
    image_generation_pb2_grpc,
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
    text_generation_pb2,
    text_generation_pb2_grpc,
    text_transform_pb2,
    text_transform_pb2_grpc,
    token_classification_pb2,
    token_classification_pb2_grpc,
)
from taskserve.server.frontends.grpc.tasks.call import TaskServicer
from taskserve.server.frontends.grpc.tasks.fill_mask import FillMaskServicer
from taskserve.server.frontends.grpc.tasks.image_classification import ImageClassificationServicer
from taskserve.server.frontends.grpc.tasks.image_generation import ImageGenerationServicer
from taskserve.server.frontends.grpc.tasks.image_segmentation import ImageSegmentationServicer
from taskserve.server.frontends.grpc.tasks.image_text_match import ImageTextMatchServicer
from taskserve.server.frontends.grpc.tasks.object_detection import ObjectDetectionServicer
from taskserve.server.frontends.grpc.tasks.question_answering import QuestionAnsweringServicer
from taskserve.server.frontends.grpc.tasks.sentence_embedding import (
    SentenceEmbeddingServicer,
    SentenceSimilarityServicer,
)
from taskserve.server.frontends.grpc.tasks.text_classification import TextClassificationServicer
from taskserve.server.frontends.grpc.tasks.text_generation import TextGenerationServicer
from taskserve.server.frontends.grpc.tasks.text_transform import (
    SummarizationServicer,
    Text2TextServicer,
    TranslationServicer,
)
from taskserve.server.frontends.grpc.tasks.token_classification import TokenClassificationServicer
from taskserve.server.frontends.parts import build_tasks
from taskserve.server.serving.manager import ModelManager
from taskserve.server.tasks.base import TaskCache, TaskLimits

__all__ = ["SERVICES", "Service", "add_task_servicers"]


@dataclass(frozen=True)
class Service:
    """One typed gRPC service: its proto module and name, the generated registration
    function and the servicer class."""

    module: Any
    name: str
    add: Callable[[Any, grpc.aio.Server], None]
    servicer: type[TaskServicer]

    @property
    def full_name(self) -> str:
        return str(self.module.DESCRIPTOR.services_by_name[self.name].full_name)


# The transform services run on both decoders with prompt templates and encoder-decoders.
_TRANSFORMS = (
    Service(text_transform_pb2, "Translation", text_transform_pb2_grpc.add_TranslationServicer_to_server, TranslationServicer),
    Service(text_transform_pb2, "Summarization", text_transform_pb2_grpc.add_SummarizationServicer_to_server, SummarizationServicer),
    Service(text_transform_pb2, "Text2Text", text_transform_pb2_grpc.add_Text2TextServicer_to_server, Text2TextServicer),
)  # fmt: skip

# The typed services of each registered task (tasks/registry.py), by the same config.yaml
# task name: a task's row there and its row here are the two a new typed task adds
# (tests/tasks/test_registry.py keeps the keys equal). Tasks cannot import this side
# (no gRPC below the front ends), so the services are keyed here, not in the registry.
SERVICES: dict[str, tuple[Service, ...]] = {
    "text-classification": (
        Service(text_classification_pb2, "TextClassification", text_classification_pb2_grpc.add_TextClassificationServicer_to_server, TextClassificationServicer),
    ),
    "token-classification": (
        Service(token_classification_pb2, "TokenClassification", token_classification_pb2_grpc.add_TokenClassificationServicer_to_server, TokenClassificationServicer),
    ),
    "sentence-embedding": (
        Service(sentence_embedding_pb2, "SentenceEmbedding", sentence_embedding_pb2_grpc.add_SentenceEmbeddingServicer_to_server, SentenceEmbeddingServicer),
        Service(sentence_embedding_pb2, "SentenceSimilarity", sentence_embedding_pb2_grpc.add_SentenceSimilarityServicer_to_server, SentenceSimilarityServicer),
    ),
    "question-answering": (
        Service(question_answering_pb2, "QuestionAnswering", question_answering_pb2_grpc.add_QuestionAnsweringServicer_to_server, QuestionAnsweringServicer),
    ),
    "fill-mask": (Service(fill_mask_pb2, "FillMask", fill_mask_pb2_grpc.add_FillMaskServicer_to_server, FillMaskServicer),),
    "image-classification": (
        Service(image_classification_pb2, "ImageClassification", image_classification_pb2_grpc.add_ImageClassificationServicer_to_server, ImageClassificationServicer),
    ),
    "object-detection": (
        Service(object_detection_pb2, "ObjectDetection", object_detection_pb2_grpc.add_ObjectDetectionServicer_to_server, ObjectDetectionServicer),
    ),
    "image-segmentation": (
        Service(image_segmentation_pb2, "ImageSegmentation", image_segmentation_pb2_grpc.add_ImageSegmentationServicer_to_server, ImageSegmentationServicer),
    ),
    "image-text-match": (
        Service(image_text_match_pb2, "ImageTextMatch", image_text_match_pb2_grpc.add_ImageTextMatchServicer_to_server, ImageTextMatchServicer),
    ),
    "text-generation": (
        Service(text_generation_pb2, "TextGeneration", text_generation_pb2_grpc.add_TextGenerationServicer_to_server, TextGenerationServicer),
        *_TRANSFORMS,
    ),
    "text2text-generation": _TRANSFORMS,
    "image-generation": (
        Service(image_generation_pb2, "ImageGeneration", image_generation_pb2_grpc.add_ImageGenerationServicer_to_server, ImageGenerationServicer),
    ),
}  # fmt: skip


def services() -> list[Service]:
    """Every service of ``SERVICES`` once, in table order."""
    return list(dict.fromkeys(service for row in SERVICES.values() for service in row))


def add_task_servicers(
    server: grpc.aio.Server,
    models: ModelManager,
    limits: TaskLimits | None = None,
    workers: int | None = None,
    tasks: TaskCache | None = None,
) -> list[str]:
    """Register every typed service on ``server``; returns their full names (for
    reflection and health). They share one worker pool for pre- and post-processing,
    sized to the machine's cores unless ``workers`` says otherwise; ``tasks``: the
    cache the other doors share (frontends/parts.py), built here when not given."""
    if tasks is None:
        tasks = build_tasks(models, limits, workers)
    names = []
    for service in services():
        service.add(service.servicer(models, tasks), server)
        names.append(service.full_name)
    return names
