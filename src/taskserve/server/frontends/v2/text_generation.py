"""The LLM tensor convention of Triton's vLLM backend, for models that generate text.

A caller sends ``text_input`` (BYTES, [1]: the prompt), optionally ``stream`` (BOOL,
[1]), ``sampling_parameters`` (BYTES, [1]: a JSON object) and
``exclude_input_in_output`` (BOOL, [1]); it gets ``text_output`` (BYTES, [1]). The
step graph the model really runs (``input_ids``, ``past_key.N``, ...) stays internal.

The sampling keys (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
``stop``, ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``) may also
come as request parameters (what Triton's generate extension does with its ``parameters``
object); the ``sampling_parameters`` input wins where both set a key. Keys left unset take
the typed TextGeneration service's defaults: temperature 0 (greedy), no top-k/top-p cut,
``task_options.max_new_tokens`` tokens. So the same request gives the same greedy text
through every door.

``exclude_input_in_output`` left unset: the prompt is written before the generated text
in a whole answer and left out of a stream (as the vLLM backend does); set, it decides.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass

import numpy as np

from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.v2.values import integer, json_object
from taskserve.server.repository.config import TensorConfig
from taskserve.server.tasks.base import CallOptions, ServedModel
from taskserve.server.tasks.decoding import Sampling
from taskserve.server.tasks.seq2seq import Seq2SeqGenerator
from taskserve.server.tasks.text_generation import GenerateParams, GenerationChunk, TextGenerator
from taskserve.server.tasks.transform import TransformInput, TransformKind

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"
INPUTS = (
    TensorConfig(name=TEXT_INPUT, datatype="BYTES", dims=(1,)),
    TensorConfig(name="stream", datatype="BOOL", dims=(1,), optional=True),
    TensorConfig(name="sampling_parameters", datatype="BYTES", dims=(1,), optional=True),
    TensorConfig(name="exclude_input_in_output", datatype="BOOL", dims=(1,), optional=True),
)
OUTPUTS = (TensorConfig(name=TEXT_OUTPUT, datatype="BYTES", dims=(1,)),)
SAMPLING_KEYS = (
    "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip
# Characters of a sampling_parameters JSON object: far more than the keys need, checked before parsing.
MAX_SAMPLING_CHARS = 16_384

GeneratingTask = TextGenerator | Seq2SeqGenerator


@dataclass(frozen=True)
class TextRequest:
    """One request in the convention, as the task needs it."""

    prompt: str
    params: GenerateParams
    # Chunks as they come (a streaming door only); otherwise one answer.
    stream: bool
    # None: unset (the prompt goes before a whole answer, not before a stream).
    exclude_input: bool | None

    def prefix(self, streaming: bool) -> str:
        """What goes before the generated text: the prompt, unless excluded."""
        exclude = (streaming and self.stream) if self.exclude_input is None else self.exclude_input
        return "" if exclude else self.prompt


def _scalar(tensors: Mapping[str, np.ndarray], name: str) -> object | None:
    array = tensors.get(name)
    if array is None:
        return None
    if array.size != 1:
        raise InvalidInput(f"input {name!r} holds {array.size} elements; send exactly one")
    value: object = array.reshape(-1)[0]
    return value


def _text(value: object, name: str) -> str:
    try:
        text: str = bytes(value).decode("utf-8")  # type: ignore[call-overload]
        return text
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r} is not valid UTF-8 text") from None


def text_request(tensors: Mapping[str, np.ndarray], parameters: Mapping[str, object]) -> TextRequest:
    """The request the decoded input tensors and request parameters make; InvalidInput
    names any value that does not fit."""
    prompt_value = _scalar(tensors, TEXT_INPUT)
    if prompt_value is None:
        raise InvalidInput(f"input {TEXT_INPUT!r} is missing; send the prompt as a BYTES tensor of shape [1]")
    prompt = _text(prompt_value, TEXT_INPUT)
    sampling: dict[str, object] = {k: parameters[k] for k in SAMPLING_KEYS if k in parameters}
    raw = _scalar(tensors, "sampling_parameters")
    if raw is not None:
        text = _text(raw, "sampling_parameters")
        sampling.update(json_object(text, "sampling_parameters", SAMPLING_KEYS, MAX_SAMPLING_CHARS))
    # Triton's generate extension callers often send these two as request parameters too.
    stream = _scalar(tensors, "stream")
    if stream is None:
        stream = _flag(parameters, "stream")
    exclude = _scalar(tensors, "exclude_input_in_output")
    if exclude is None:
        exclude = _flag(parameters, "exclude_input_in_output")
    return TextRequest(
        prompt=prompt,
        params=_params(sampling),
        stream=bool(stream) if stream is not None else False,
        exclude_input=bool(exclude) if exclude is not None else None,
    )


def _flag(parameters: Mapping[str, object], key: str) -> bool | None:
    value = parameters.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise InvalidInput(f"parameter {key!r} must be a bool, got {str(value)[:40]!r}")
    return value


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{key} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _optional_number(sampling: Mapping[str, object], key: str, default: float) -> float:
    value = sampling.get(key)
    return default if value is None else _number(key, value)


def _params(sampling: Mapping[str, object]) -> GenerateParams:
    max_tokens = 0
    if sampling.get("max_tokens") is not None:
        max_tokens = integer("max_tokens", sampling["max_tokens"])
        if max_tokens < 1:
            raise InvalidInput(f"max_tokens must be at least 1, got {max_tokens}")
    top_k = integer("top_k", sampling["top_k"]) if sampling.get("top_k") is not None else 0
    if top_k == -1:
        top_k = 0  # vLLM's "no limit"
    seed = integer("seed", sampling["seed"]) if sampling.get("seed") is not None else None
    if seed is not None and not 0 <= seed < 2**64:
        raise InvalidInput(f"seed must be in [0, 2**64), got {seed}")
    stop = sampling.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise InvalidInput("stop must be a string or a list of strings")
    return GenerateParams(
        max_new_tokens=max_tokens,
        sampling=Sampling(
            temperature=_number("temperature", sampling["temperature"])
            if sampling.get("temperature") is not None
            else 0.0,
            top_k=top_k,
            top_p=_number("top_p", sampling["top_p"]) if sampling.get("top_p") is not None else 1.0,
            seed=seed,
            repetition_penalty=_optional_number(sampling, "repetition_penalty", 1.0),
            presence_penalty=_optional_number(sampling, "presence_penalty", 0.0),
            frequency_penalty=_optional_number(sampling, "frequency_penalty", 0.0),
        ),
        stop=stops,
    )


async def chunks(
    task: GeneratingTask, request: TextRequest, options: CallOptions, models: Callable[[str], ServedModel]
) -> AsyncGenerator[GenerationChunk, None]:
    """The task's chunks for ``request``: the prompt continued by a decoder, or the text
    rewritten by an encoder-decoder (its text2text template); ``models`` finds the encoder."""
    if isinstance(task, TextGenerator):
        inner = task.generate(request.prompt, (), request.params, options)
    else:
        encoder = models(task.encoder_model)
        inner = task.transform(
            TransformInput(TransformKind.TEXT2TEXT, request.prompt), request.params, options, encoder
        )
    try:
        async for chunk in inner:
            yield chunk
    finally:
        close = getattr(inner, "aclose", None)
        if close is not None:
            await close()  # a consumer gone: the sequence leaves the engine now


def text_tensors(text: str) -> dict[str, np.ndarray]:
    """``text_output`` holding ``text``."""
    output = np.empty(1, dtype=np.object_)
    output[0] = text.encode("utf-8")
    return {TEXT_OUTPUT: output}


async def whole(
    task: GeneratingTask, request: TextRequest, options: CallOptions, models: Callable[[str], ServedModel]
) -> dict[str, np.ndarray]:
    """The whole answer in one response (ModelInfer, a request that does not stream)."""
    parts = [request.prefix(streaming=False)]
    generated = chunks(task, request, options, models)
    try:
        async for chunk in generated:
            parts.append(chunk.text)
    finally:
        await generated.aclose()
    return text_tensors("".join(parts))


async def streamed(
    task: GeneratingTask, request: TextRequest, options: CallOptions, models: Callable[[str], ServedModel]
) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool], None]:
    """(outputs, last) per response on a streaming door: one per chunk when the request
    says ``stream``, else the whole answer as one response."""
    if not request.stream:
        yield await whole(task, request, options, models), True
        return
    prefix = request.prefix(streaming=True)
    generated = chunks(task, request, options, models)
    try:
        async for chunk in generated:
            yield text_tensors(prefix + chunk.text), chunk.finish_reason is not None
            prefix = ""
    finally:
        await generated.aclose()  # a consumer gone: the sequence leaves the engine now
