"""Text classification: texts -> labels with scores.

task_options: ``output`` (default "logits"), ``activation`` ("softmax" | "sigmoid" |
"none"), ``problem_type`` ("multi_label_classification" selects sigmoid),
``top_k`` (default: every label), ``truncation``, plus the tokenizer's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.tasks.base import (
    CallOptions,
    LabelScore,
    ScoreFunction,
    apply_function,
    check_texts,
    ranked,
)
from taskserve.server.tasks.text import TextOptions, TextTask


@dataclass(frozen=True)
class ClassifyTextParams:
    # 0: task_options.top_k, else every label.
    top_k: int = 0
    # None: task_options.activation, else by problem type.
    function: ScoreFunction | None = None
    # None: task_options.truncation.
    truncate: bool | None = None


class TextClassificationOptions(TextOptions):
    top_k: int | None = Field(None, ge=1, description="labels per text when a request does not say (default: all)")
    problem_type: str | None = Field(
        None, description="multi_label_classification: sigmoid scores unless activation says otherwise"
    )
    multi_label: bool = Field(False, description="the same as problem_type multi_label_classification")


class TextClassifier(TextTask):
    task = "text-classification"
    options: TextClassificationOptions

    def default_function(self, num_labels: int) -> ScoreFunction:
        configured = self.score_function_option()
        if configured is not None:
            return configured
        multi = self.options.problem_type == "multi_label_classification" or self.options.multi_label
        # One logit is a binary score: sigmoid, as Hugging Face pipelines do.
        return ScoreFunction.SIGMOID if multi or num_labels == 1 else ScoreFunction.SOFTMAX

    async def classify(
        self, texts: Sequence[str], params: ClassifyTextParams, options: CallOptions
    ) -> list[tuple[LabelScore, ...]]:
        """One ranked label list per text, in order."""
        check_texts("texts", texts, self.limits)
        batch = await self.tokenize(texts, self.truncate(params.truncate))
        output = self.output_name("logits", self.options.output)
        logits = (await self.run_model(batch, options, [output]))[output].astype(np.float32)
        num_labels = logits.shape[-1]
        function = params.function or self.default_function(num_labels)
        labels = self.labels(num_labels)
        top_k = params.top_k or self.options.top_k or num_labels

        def postprocess() -> list[tuple[LabelScore, ...]]:
            scores = apply_function(logits, function)
            return [ranked(row, labels, top_k) for row in scores]

        return await self.offload("postprocess", postprocess)
