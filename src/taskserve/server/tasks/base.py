"""What every task shares: the model it runs on, the worker pool, limits, and
the call into the scheduler.

A task turns Python values (texts, decoded images, option dataclasses) into
``InferRequest``s, awaits the model's scheduler and turns the tensors back into
small frozen dataclasses. Tasks know nothing of gRPC: front ends decode their
wire format into these types and encode the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, TypeVar, get_type_hints

import numpy as np

from taskserve.protocol.datatypes import numpy_dtype
from taskserve.server.errors import Code, ConfigError, InvalidInput, Overloaded, WrongTask
from taskserve.server.repository.config import ModelConfig, ModelLimits
from taskserve.server.repository.paths import resolve_inside, shown
from taskserve.server.scheduling.base import InferRequest, Scheduler
from taskserve.server.scheduling.engine_api import GenerationEngine
from taskserve.server.tasks.options import TaskOptions, options_problems

T = TypeVar("T")


class ServedModel(Protocol):
    """The part of a loaded model version a task needs (``LoadedModel`` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def config(self) -> ModelConfig: ...
    @property
    def model_dir(self) -> Path: ...
    # Exactly one is set: the request batcher, or the generation engine (a generation: block).
    @property
    def scheduler(self) -> Scheduler | None: ...
    @property
    def engine(self) -> GenerationEngine | None: ...


def batcher_of(model: ServedModel) -> Scheduler:
    """The model's request batcher; a model served by the generation engine has none."""
    if model.scheduler is None:
        raise TaskConfigError(
            f"model {model.name!r} runs on the generation engine and takes no single requests; "
            "serve it through a generation task (TextGeneration)"
        )
    return model.scheduler


def engine_of(model: ServedModel) -> GenerationEngine:
    """The model's generation engine; a model without a generation: block has none."""
    if model.engine is None:
        raise TaskConfigError(
            f"model {model.name!r} is not served by the generation engine (no generation: block in its "
            "config.yaml); export it with taskserve-export hf DIR --task text-generation"
        )
    return model.engine


class StageRecorder(Protocol):
    def stage(self, stage: str, duration_ns: int) -> None: ...


class TaskConfigError(ConfigError):
    """A model's task files or task_options are wrong: the model cannot serve its task."""

    code = Code.FAILED_PRECONDITION


@dataclass(frozen=True)
class LabelScore:
    label: str
    score: float
    # Class index in the model's output.
    index: int


class ScoreFunction(enum.Enum):
    SOFTMAX = "softmax"
    SIGMOID = "sigmoid"
    NONE = "none"


@dataclass(frozen=True)
class TaskLimits:
    """Input limits every typed request is checked against before any work."""

    # Items (texts, images, question/context pairs) in one request.
    max_items: int = 256
    # Characters in one text (before tokenization, which is CPU work).
    max_text_chars: int = 100_000
    # Pixels in one decoded image; larger ones are refused as decompression bombs.
    max_image_pixels: int = 40_000_000
    # Pixels over all the images of one request (checked on the headers, before decoding).
    max_request_pixels: int = 100_000_000
    # Typed requests being processed at once; beyond it callers get RESOURCE_EXHAUSTED at once.
    max_concurrent_requests: int = 1024

    def for_model(self, limits: ModelLimits) -> TaskLimits:
        """These limits with a model's config.yaml ``limits`` (its set fields) applied."""
        overrides = {k: v for k, v in limits.model_dump().items() if v is not None and hasattr(self, k)}
        return dataclasses.replace(self, **overrides) if overrides else self


@dataclass(frozen=True)
class CallOptions:
    """Scheduling hints of one request."""

    # 1 is the highest; None takes the model's default.
    priority: int | None = None
    # Absolute time.monotonic() after which the request must not be computed.
    deadline: float | None = None
    # Called once when a streaming task has its first chunk ready: the front end times it,
    # per door (metrics' taskserve_protocol_time_to_first_chunk_seconds).
    first_chunk: Callable[[], None] | None = None


class TaskContext:
    """Shared by all tasks of a server: the worker pool for CPU-heavy pre- and
    post-processing (tokenization, image decoding) and the admission counter.

    ``run`` and ``admit`` are called on the event loop only.
    """

    def __init__(
        self,
        limits: TaskLimits | None = None,
        workers: int = 2,
        models: Callable[[str], ServedModel] | None = None,
    ) -> None:
        self.limits = limits or TaskLimits()
        # Other served models by name, for tasks built from several entries (a diffusion
        # pipeline's text encoder and VAE); raises ModelNotFound / ModelNotReady.
        self.models = models
        self.executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="task-worker")
        self._active = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run blocking ``fn(*args)`` on the worker pool and await its result."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Take a permit without waiting: refuse at once when the server is saturated."""
        if self._active >= self.limits.max_concurrent_requests:
            raise Overloaded(
                f"the server is processing {self._active} typed requests, its limit; retry with backoff"
            )
        self._active += 1
        try:
            yield
        finally:
            self._active -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


class Task:
    """Base of the per-task classes. One instance per loaded model version,
    built by ``load`` (blocking: reads tokenizer and label files) on the worker pool.

    A subclass declares its options by annotating ``options`` with its options model
    (``options: TextClassificationOptions``): that annotation is both the attribute's
    type and the model its ``task_options`` are validated with (``options_model``)."""

    # The config.yaml ``task`` this class serves.
    task: ClassVar[str]
    # This model version's task_options, validated (defaults filled in).
    options: TaskOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        self.model = model
        self.context = context
        self.options = parse_options(type(self), model.name, model.config.task_options)
        # The server's limits with this model's config.yaml ``limits`` applied.
        self.limits = context.limits.for_model(model.config.limits)
        self._labels = self._read_labels()

    @classmethod
    def options_model(cls) -> type[TaskOptions]:
        """The options model this class's ``options`` annotation names."""
        return _options_model(cls)

    @classmethod
    def load(cls, model: ServedModel, context: TaskContext) -> Self:
        return cls(model, context)

    # -- helpers for subclasses ------------------------------------------------

    def input_names(self) -> set[str] | None:
        """Inputs the model declares; None when unknown (every input is then sent)."""
        return {t.name for t in self.model.config.inputs} if self.model.config.inputs is not None else None

    def output_names(self) -> set[str] | None:
        return {t.name for t in self.model.config.outputs} if self.model.config.outputs is not None else None

    def input_dtype(self, name: str, default: type[np.generic] = np.int64) -> np.dtype[np.generic]:
        for tensor in self.model.config.inputs or ():
            if tensor.name == name:
                return np.dtype(numpy_dtype(tensor.datatype))
        return np.dtype(default)

    def output_name(self, default: str, configured: str | None, key: str = "output") -> str:
        """The output to read: ``configured`` (task_options[key]), else ``default`` when
        the model has it, else the model's only output."""
        if configured:
            return configured
        names = self.output_names()
        if names is None or default in names:
            return default
        if len(names) == 1:
            return next(iter(names))
        raise TaskConfigError(
            f"model {self.model.name!r} has no output {default!r} and several others {sorted(names)}; "
            f"set task_options.{key} to the one to use"
        )

    def score_function_option(self) -> ScoreFunction | None:
        """task_options.activation (softmax | sigmoid | none), when set."""
        return ScoreFunction(self.options.activation) if self.options.activation else None

    def _read_labels(self) -> list[str]:
        """Class names from the config's labels file, else task_options.id2label."""
        if self.model.config.labels:
            path = resolve_inside(self.model.model_dir, self.model.config.labels, "labels")
            if not path.is_file():
                shown_path = shown(path, self.model.model_dir)
                raise TaskConfigError(f"model {self.model.name!r}: labels file {shown_path} is missing")
            return [line.rstrip("\r") for line in path.read_text(encoding="utf-8").splitlines()]
        id2label = self.options.id2label
        if id2label:
            pairs = {int(k): str(v) for k, v in id2label.items()}
            return [pairs.get(i, f"LABEL_{i}") for i in range(max(pairs, default=-1) + 1)]
        return []

    def labels(self, count: int) -> list[str]:
        """``count`` class names; classes without a name are called LABEL_i."""
        names = self._labels[:count]
        return names + [f"LABEL_{i}" for i in range(len(names), count)]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (preprocess, postprocess) into the model's metrics when it has them."""
        start = time.perf_counter_ns()
        try:
            yield
        finally:
            metrics: StageRecorder | None = getattr(self.model, "metrics", None)
            if metrics is not None:
                metrics.stage(name, time.perf_counter_ns() - start)

    async def offload(self, stage: str, fn: Callable[..., T], *args: object) -> T:
        """Run CPU work (tokenizing, decoding, post-processing) on the worker pool,
        timed as ``stage``, so the event loop stays free."""
        with self.stage(stage):
            return await self.context.run(fn, *args)

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        options: CallOptions,
        outputs: Sequence[str] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run rows through the model's batcher and return the outputs for all rows (``infer_rows``)."""
        return await infer_rows(self.model, inputs, options, outputs)


TaskT = TypeVar("TaskT", bound=Task)


# Task class -> its options model, resolved from the annotation once.
_OPTIONS_MODELS: dict[type[Task], type[TaskOptions]] = {}


def _options_model(cls: type[Task]) -> type[TaskOptions]:
    found = _OPTIONS_MODELS.get(cls)
    if found is None:
        declared = get_type_hints(cls).get("options")
        if not (isinstance(declared, type) and issubclass(declared, TaskOptions)):
            raise TypeError(f"{cls.__name__}.options must be annotated with a TaskOptions model, not {declared!r}")
        found = _OPTIONS_MODELS[cls] = declared
    return found


def parse_options(cls: type[Task], model: str, given: Mapping[str, Any]) -> Any:
    """``given`` (a config's task_options) validated by ``cls``'s options model;
    TaskConfigError with every problem when they do not validate."""
    options_model = cls.options_model()
    problems = options_problems(cls.task, options_model, dict(given))
    if problems:
        raise TaskConfigError(f"model {model!r}: " + "; ".join(problems) + "; fix config.yaml")
    return options_model.model_validate(dict(given))


def _concat_rows(parts: list[np.ndarray]) -> np.ndarray:
    """Join chunks along the row axis. The batcher may pad a chunk's variable axes
    beyond this request's own length (padding goes at the end), so every axis is
    cut to the shortest chunk's size first; callers slice to their own lengths."""
    if len(parts) == 1:
        return parts[0]
    ndim = parts[0].ndim
    sizes = [min(p.shape[axis] for p in parts) for axis in range(1, ndim)]
    return np.concatenate([p[(slice(None), *(slice(0, s) for s in sizes))] for p in parts], axis=0)


class TaskCache:
    """One task instance per loaded model version, built on first use (or by the load check).

    Keyed by the model object: during a swap the old version (finishing the requests that
    resolved it) and the new one share a name and version number but each keeps its own
    task, so neither rebuilds the other's. ``forget`` drops a retired version's entries.
    Called on the event loop only.
    """

    def __init__(self, context: TaskContext) -> None:
        self.context = context
        # id(model) is unique while the entry holds the model itself.
        self._entries: dict[tuple[int, type[Task]], tuple[ServedModel, Task]] = {}
        # Loads in progress, so concurrent first requests share one load.
        self._loading: dict[tuple[int, type[Task]], asyncio.Future[Task]] = {}

    async def get(self, model: ServedModel, cls: type[TaskT]) -> TaskT:
        check_task(model, cls.task)
        key = (id(model), cls)
        entry = self._entries.get(key)
        if entry is None:
            pending = self._loading.get(key)
            if pending is None:
                pending = asyncio.ensure_future(self._load(model, cls))
                self._loading[key] = pending
                try:
                    self._entries[key] = (model, await pending)
                finally:
                    del self._loading[key]
            else:
                await pending
            entry = self._entries[key]
        task = entry[1]
        assert isinstance(task, cls)
        return task

    def forget(self, model: ServedModel) -> None:
        """Drop the tasks built for ``model`` (a version leaving service), so they and the
        model they hold are freed now."""
        for key in [k for k, (m, _) in self._entries.items() if m is model]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    async def _load(self, model: ServedModel, cls: type[Task]) -> Task:
        loaded: Task = await self.context.run(cls.load, model, self.context)
        return loaded


def check_task(model: ServedModel, expected: str) -> None:
    if model.config.task != expected:
        raise WrongTask(
            f"model {model.name!r} serves task {model.config.task!r}; this service needs a {expected!r} model"
        )


def check_count(what: str, count: int, limits: TaskLimits) -> None:
    if count == 0:
        raise InvalidInput(f"{what}: the request holds none; send at least one")
    if count > limits.max_items:
        raise InvalidInput(
            f"{what}: {count} items exceed the limit of {limits.max_items} per request; split the request "
            "(or raise limits.max_items in the model's config.yaml, or --max-items)"
        )


def check_texts(what: str, texts: Sequence[str], limits: TaskLimits) -> None:
    """Count, emptiness and size of a request's texts."""
    check_count(what, len(texts), limits)
    for i, text in enumerate(texts):
        if not text.strip():
            raise InvalidInput(f"{what}[{i}] is empty; every text needs some content")
        if len(text) > limits.max_text_chars:
            raise InvalidInput(
                f"{what}[{i}] has {len(text)} characters, over the limit of {limits.max_text_chars}; shorten it "
                "(or raise limits.max_text_chars in the model's config.yaml, or --max-text-chars)"
            )


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    shifted = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(shifted)
    out: np.ndarray = e / np.sum(e, axis=axis, keepdims=True)
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 1.0 / (1.0 + np.exp(-x))
    return out


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores of a 1-D array, best first (ties by index)."""
    k = min(k, scores.shape[0])
    order: np.ndarray = np.argsort(-scores, kind="stable")[:k]
    return order


def apply_function(logits: np.ndarray, function: ScoreFunction) -> np.ndarray:
    if function is ScoreFunction.SOFTMAX:
        return softmax(logits, axis=-1)
    if function is ScoreFunction.SIGMOID:
        return sigmoid(logits)
    return logits


def ranked(scores: np.ndarray, labels: Sequence[str], top_k: int) -> tuple[LabelScore, ...]:
    """The ``top_k`` best labels of a row of scores, best first."""
    return tuple(LabelScore(labels[i], float(scores[i]), int(i)) for i in top_k_indices(scores, top_k))


async def infer_rows(
    model: ServedModel,
    inputs: Mapping[str, np.ndarray],
    options: CallOptions,
    outputs: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Run rows through ``model``'s batcher and return the outputs for all rows.

    Every input's first axis is the row axis. A model that batches takes at most
    ``max_batch_size`` rows per request, so rows are sent in chunks, concurrently,
    which lets the batcher pack them with other callers' rows. A model that does
    not batch gets all rows in one request (its graph's own leading axis).
    """
    rows = next(iter(inputs.values())).shape[0]
    limit = model.config.max_batch_size
    wanted = tuple(outputs) if outputs is not None else None
    if limit <= 0 or rows <= limit:
        chunks = [dict(inputs)]
    else:
        chunks = [{k: v[i : i + limit] for k, v in inputs.items()} for i in range(0, rows, limit)]
    requests = [
        InferRequest(inputs=chunk, output_names=wanted, priority=options.priority, deadline=options.deadline)
        for chunk in chunks
    ]
    scheduler = batcher_of(model)
    results = await asyncio.gather(*(scheduler.submit(r) for r in requests))
    names = wanted or tuple(results[0].outputs)
    return {name: _concat_rows([r.outputs[name] for r in results]) for name in names}
