"""Which tensors a model presents over v2, and how a request to a generating model runs.

Most models present their graph's tensors. Three kinds present a face instead, the
same through gRPC and REST (ModelMetadata, ModelConfig, infer, streaming):

- text generation (every text-generation entry runs on the generation engine) and
  encoder-decoders (``text2text-generation``): the LLM convention of Triton's vLLM
  backend (``text_generation.py``), decoupled: a stream answers one response per chunk;
- image generation: prompt in, PNG images out (``image_generation.py``).

The doors decode a request's tensors against ``config(model)`` (the face's inputs),
call ``infer`` or ``stream`` here, and encode the output tensors. Called on the event
loop only.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping

import numpy as np

from taskserve.server.frontends.v2 import image_generation, text_generation
from taskserve.server.repository.config import ModelConfig
from taskserve.server.tasks.base import CallOptions, ServedModel, TaskCache
from taskserve.server.tasks.image_generation import ImageGenerator
from taskserve.server.tasks.seq2seq import Seq2SeqGenerator
from taskserve.server.tasks.text_generation import TextGenerator

# The config.yaml tasks that may present a face (checked first: one set lookup per request).
FACED_TASKS = frozenset({TextGenerator.task, Seq2SeqGenerator.task, ImageGenerator.task})


def presents_text(model: ServedModel) -> bool:
    """True when ``model`` speaks the LLM convention (text_input -> text_output)."""
    task = model.config.task
    if task == Seq2SeqGenerator.task:
        return True
    return task == TextGenerator.task and model.engine is not None


def has_face(model: ServedModel) -> bool:
    config = model.config
    return config.task in FACED_TASKS and (config.task == ImageGenerator.task or presents_text(model))


def is_decoupled(model: ServedModel) -> bool:
    """True when one request may get several responses (Triton's decoupled transaction policy)."""
    return model.config.task in FACED_TASKS and presents_text(model)


class Faces:
    """The faces of the served models; shares the task objects of the typed services."""

    def __init__(self, tasks: TaskCache, models: Callable[[str], ServedModel]) -> None:
        self.tasks = tasks
        # Other entries by name (an encoder-decoder's encoder); raises ModelNotFound / ModelNotReady.
        self._models = models
        # id(model config) -> (that config, the face's config): built once per loaded version.
        self._configs: dict[int, tuple[ModelConfig, ModelConfig]] = {}

    def config(self, model: ServedModel) -> ModelConfig:
        """What ModelMetadata, ModelConfig and the input checks show for ``model``: its own
        config, or for a model with a face, the face's inputs and outputs (no batch dimension)."""
        config = model.config
        if config.task not in FACED_TASKS or not has_face(model):
            return config
        cached = self._configs.get(id(config))
        if cached is not None and cached[0] is config:
            return cached[1]
        if len(self._configs) > 256:
            self._configs.clear()  # many reloads: forget configs of unloaded versions
        module = image_generation if config.task == ImageGenerator.task else text_generation
        face = config.model_copy(
            update={"inputs": module.INPUTS, "outputs": module.OUTPUTS, "max_batch_size": 0, "labels": None}
        )
        self._configs[id(config)] = (config, face)
        return face

    async def infer(
        self, model: ServedModel, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, object],
        options: CallOptions,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """One whole answer (ModelInfer, REST infer and generate)."""
        if model.config.task == ImageGenerator.task:
            image_task = await self.tasks.get(model, ImageGenerator)
            return await image_generation.generate(image_task, tensors, parameters, options)
        request = text_generation.text_request(tensors, parameters)
        task = await self._text_task(model)
        return await text_generation.whole(task, request, options, self._models)

    async def stream(
        self, model: ServedModel, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, object],
        options: CallOptions,
    ) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool], None]:  # fmt: skip
        """(outputs, last) per response on a streaming door (ModelStreamInfer, generate_stream)."""
        if not is_decoupled(model):
            yield await self.infer(model, tensors, parameters, options), True
            return
        request = text_generation.text_request(tensors, parameters)
        task = await self._text_task(model)
        responses = text_generation.streamed(task, request, options, self._models)
        try:
            async for item in responses:
                yield item
        finally:
            await responses.aclose()

    async def _text_task(self, model: ServedModel) -> text_generation.GeneratingTask:
        if model.config.task == Seq2SeqGenerator.task:
            return await self.tasks.get(model, Seq2SeqGenerator)
        return await self.tasks.get(model, TextGenerator)
