"""Every typed task, one row each: the config.yaml ``task`` it serves, its class and its
options model. The one place a new task is registered: its module declares the class and
options model, its row here makes the server load and check models of that task. (A typed
gRPC service is the front end's: ``frontends/grpc/tasks/__init__.py`` keys its services by
the same names, and a test keeps the two tables complete.)"""

from __future__ import annotations

from dataclasses import dataclass

from taskserve.server.tasks.base import Task
from taskserve.server.tasks.fill_mask import FillMaskOptions, MaskFiller
from taskserve.server.tasks.generation_options import TextGenerationOptions
from taskserve.server.tasks.image_classification import ImageClassificationOptions, ImageClassifier
from taskserve.server.tasks.image_generation import ImageGenerationOptions, ImageGenerator
from taskserve.server.tasks.image_segmentation import ImageSegmentationOptions, ImageSegmenter
from taskserve.server.tasks.image_text_match import ImageTextMatcher, ImageTextMatchOptions
from taskserve.server.tasks.object_detection import ObjectDetectionOptions, ObjectDetector
from taskserve.server.tasks.options import TaskOptions
from taskserve.server.tasks.question_answering import QuestionAnswerer, QuestionAnsweringOptions
from taskserve.server.tasks.sentence_embedding import SentenceEmbedder, SentenceEmbeddingOptions
from taskserve.server.tasks.seq2seq import Seq2SeqGenerator, Seq2SeqOptions
from taskserve.server.tasks.text_classification import TextClassificationOptions, TextClassifier
from taskserve.server.tasks.text_generation import TextGenerator
from taskserve.server.tasks.token_classification import TokenClassificationOptions, TokenClassifier


@dataclass(frozen=True)
class TaskRow:
    """One typed task. Checked when the table is built: the class serves ``task`` and its
    ``options`` annotation is ``options`` (so neither can drift from the row)."""

    task: str
    cls: type[Task]
    options: type[TaskOptions]

    def __post_init__(self) -> None:
        if self.cls.task != self.task or self.cls.options_model() is not self.options:
            raise TypeError(
                f"registry row {self.task!r}: {self.cls.__name__} serves {self.cls.task!r} with "
                f"{self.cls.options_model().__name__}, not {self.options.__name__}"
            )


ROWS: tuple[TaskRow, ...] = (
    TaskRow("text-classification", TextClassifier, TextClassificationOptions),
    TaskRow("token-classification", TokenClassifier, TokenClassificationOptions),
    TaskRow("sentence-embedding", SentenceEmbedder, SentenceEmbeddingOptions),
    TaskRow("question-answering", QuestionAnswerer, QuestionAnsweringOptions),
    TaskRow("fill-mask", MaskFiller, FillMaskOptions),
    TaskRow("image-classification", ImageClassifier, ImageClassificationOptions),
    TaskRow("object-detection", ObjectDetector, ObjectDetectionOptions),
    TaskRow("image-segmentation", ImageSegmenter, ImageSegmentationOptions),
    TaskRow("image-text-match", ImageTextMatcher, ImageTextMatchOptions),
    TaskRow("text-generation", TextGenerator, TextGenerationOptions),
    TaskRow("text2text-generation", Seq2SeqGenerator, Seq2SeqOptions),
    TaskRow("image-generation", ImageGenerator, ImageGenerationOptions),
)

# The rows by config.yaml ``task``.
TASKS: dict[str, TaskRow] = {row.task: row for row in ROWS}
