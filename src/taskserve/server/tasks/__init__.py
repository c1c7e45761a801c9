"""Per-task pre- and post-processing around the scheduler: Python types in,
small frozen dataclasses out. No gRPC here; front ends convert."""

from __future__ import annotations

from taskserve.server.tasks.base import CallOptions, LabelScore, Task, TaskCache, TaskContext, TaskLimits
from taskserve.server.tasks.fill_mask import MaskFiller
from taskserve.server.tasks.image_classification import ImageClassifier
from taskserve.server.tasks.image_generation import ImageGenerator
from taskserve.server.tasks.image_segmentation import ImageSegmenter
from taskserve.server.tasks.image_text_match import ImageTextMatcher
from taskserve.server.tasks.object_detection import ObjectDetector
from taskserve.server.tasks.question_answering import QuestionAnswerer
from taskserve.server.tasks.registry import ROWS, TASKS, TaskRow
from taskserve.server.tasks.sentence_embedding import SentenceEmbedder
from taskserve.server.tasks.seq2seq import Seq2SeqGenerator
from taskserve.server.tasks.text_classification import TextClassifier
from taskserve.server.tasks.text_generation import TextGenerator
from taskserve.server.tasks.token_classification import TokenClassifier

__all__ = [
    "ROWS",
    "TASKS",
    "CallOptions",
    "ImageClassifier",
    "ImageGenerator",
    "ImageSegmenter",
    "ImageTextMatcher",
    "LabelScore",
    "MaskFiller",
    "ObjectDetector",
    "QuestionAnswerer",
    "SentenceEmbedder",
    "Seq2SeqGenerator",
    "Task",
    "TaskCache",
    "TaskContext",
    "TaskLimits",
    "TaskRow",
    "TextClassifier",
    "TextGenerator",
    "TokenClassifier",
]  # fmt: skip
