"""Builds one model version: the one place that picks how it executes.

A version with a ``generation:`` block, and every text2text-generation entry, runs on
the generation engine (scheduling/generation_scheduler.py): one decoder runner holding
the resident KV cache. Every other version runs on the dynamic batcher over one runtime
per instance. "No batching" is ``max_batch_size: 1`` (batches of one row) or ``0`` (no
batch dimension: each request runs alone, its inputs passed as-is), not a separate code
path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from taskserve.protocol.datatypes import numpy_dtype
from taskserve.server.metrics import ModelMetrics
from taskserve.server.repository.config import GenerationConfig, ModelConfig
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.runtimes import Runtime, TensorInfo, create_runtime
from taskserve.server.runtimes.devices import check_placements, instance_placements
from taskserve.server.scheduling.base import Scheduler
from taskserve.server.scheduling.batcher import DynamicBatcher
from taskserve.server.scheduling.engine_api import GenerationEngine
from taskserve.server.scheduling.layout import TensorLayout
from taskserve.server.scheduling.policy import BatchPolicy
from taskserve.server.serving.loaded_model import LoadedModel
from taskserve.server.serving.tensors import resolve_tensors

log = logging.getLogger(__name__)


def runs_on_engine(config: ModelConfig) -> bool:
    """Whether the generation engine serves ``config``'s versions (else the batcher)."""
    # Encoder-decoders always step on the engine; entries exported before it wrote their block get its defaults.
    return config.generation is not None or config.task == "text2text-generation"


def warmup_inputs(config: ModelConfig, batch_size: int) -> dict[str, np.ndarray]:
    """Representative inputs: variable dims at the configured size, ones everywhere."""
    inputs: dict[str, np.ndarray] = {}
    size = config.warmup.variable_dim_size
    for tensor in config.inputs or ():
        if tensor.optional:
            continue
        dims = [size if d == -1 else d for d in tensor.dims]
        shape = ([batch_size] if config.max_batch_size > 0 else []) + dims
        if tensor.datatype == "BYTES":
            arr = np.full(shape, b"warmup", dtype=np.object_)
        else:
            arr = np.ones(shape, dtype=numpy_dtype(tensor.datatype))
        inputs[tensor.name] = arr
    return inputs


def _declared(runtime: Runtime, attribute: str) -> list[TensorInfo] | None:
    # A runtime that cannot describe itself (not loaded yet) leaves the config in charge.
    try:
        tensors: list[TensorInfo] = getattr(runtime, attribute)
    except Exception:  # noqa: BLE001
        return None
    return tensors or None


def create_scheduler(
    config: ModelConfig, runtimes: Sequence[Runtime], metrics: ModelMetrics | None = None
) -> Scheduler:
    """The dynamic batcher owning ``runtimes`` (one per model instance, already loaded).

    Call ``await scheduler.start()`` on the serving event loop before submitting.
    """
    if not runtimes:
        raise ValueError(f"model {config.name!r}: create_scheduler needs at least one runtime")
    if len(runtimes) != config.instance_count:
        log.warning(
            "model %r: config asks for instance_count %d but %d runtimes were given; using %d",
            config.name, config.instance_count, len(runtimes), len(runtimes),
        )  # fmt: skip
    layout = TensorLayout.from_config(
        config, _declared(runtimes[0], "inputs"), _declared(runtimes[0], "outputs")
    )
    return DynamicBatcher(layout, BatchPolicy.from_config(config), runtimes, metrics)


@dataclass
class _Started:
    """What either path loaded, warmed and started."""

    config: ModelConfig  # inputs/outputs resolved against the graph
    runtimes: list[Runtime]
    description: str
    scheduler: Scheduler | None = None
    engine: GenerationEngine | None = None
    tensors: tuple[list[TensorInfo], list[TensorInfo]] | None = None


async def load_version(
    name: str, version: str, model_dir: Path, config: ModelConfig, metrics: ModelMetrics
) -> LoadedModel:
    """Load, warm and start one version on the batcher or the engine, as its config says.
    A failure frees what was loaded and raises."""
    started = time.perf_counter()
    model_path = resolve_inside(model_dir, f"{version}/{config.default_model_filename}", "default_model_filename")
    if runs_on_engine(config):
        served = await _start_engine(name, config, model_path, metrics)
    else:
        served = await _start_batcher(config, model_path, metrics)
    metrics.loaded(time.perf_counter() - started)
    return LoadedModel(
        name=name,
        version=version,
        config=served.config,
        model_dir=model_dir,
        scheduler=served.scheduler,
        engine=served.engine,
        metrics=metrics,
        runtimes=served.runtimes,
        platform_description=served.description,
        tensors=served.tensors,
    )


async def _start_batcher(config: ModelConfig, model_path: Path, metrics: ModelMetrics) -> _Started:
    """One runtime per instance, each loaded and warmed, under one dynamic batcher."""
    runtimes: list[Runtime] = []

    def load_and_warm() -> ModelConfig:
        sizes = [b for b in config.warmup.batch_sizes if config.max_batch_size == 0 or b <= config.max_batch_size]
        resolved: ModelConfig | None = None
        placements = instance_placements(config)
        check_placements(config, placements)  # a GPU this machine lacks: UNAVAILABLE, with the reason
        for placement in placements:
            runtime = create_runtime(model_path, config, gpu=placement.gpu)
            runtimes.append(runtime)
            runtime.load()
            if resolved is None:  # every instance loads the same graph: check it once
                resolved = resolve_tensors(config, runtime.inputs, runtime.outputs)
            if config.warmup.enabled:
                for batch in sizes or [1]:
                    runtime.warmup(warmup_inputs(resolved, batch))
        assert resolved is not None  # instance_count >= 1
        return resolved

    try:
        resolved = await asyncio.to_thread(load_and_warm)
        scheduler = create_scheduler(resolved, runtimes, metrics)
        await scheduler.start()
    except BaseException:
        for runtime in runtimes:
            runtime.close()
        raise
    return _Started(resolved, runtimes, runtimes[0].description, scheduler=scheduler)


async def _start_engine(name: str, config: ModelConfig, model_path: Path, metrics: ModelMetrics) -> _Started:
    """A decoder served by the generation engine: one runner holding the resident KV cache
    (decoder-only graphs: OnnxDecoderRunner; torch causal-lm entries: TorchDecoderRunner, the
    cache on the device; text2text-generation: optimum's merged decoder in a Seq2SeqRunner,
    the encoder staying its own entry)."""
    from taskserve.server.runtimes.generation import DecoderRunner
    from taskserve.server.scheduling.generation_scheduler import GenerationScheduler

    settings = config.generation or GenerationConfig()
    placements = instance_placements(config)
    check_placements(config, placements)  # a GPU this machine lacks: UNAVAILABLE, with the reason
    gpu = placements[0].gpu
    runtimes: list[Runtime] = []
    tensors: tuple[list[TensorInfo], list[TensorInfo]] | None = None
    load_and_warm: Callable[[], tuple[ModelConfig, DecoderRunner, str]]
    if config.task == "text2text-generation":
        from taskserve.server.runtimes.seq2seq_runner import Seq2SeqRunner

        runtime = create_runtime(model_path, config, gpu)
        runtimes.append(runtime)
        close = runtime.close

        def load_and_warm() -> tuple[ModelConfig, DecoderRunner, str]:
            runtime.load()
            resolved = resolve_tensors(config, runtime.inputs, runtime.outputs)
            if config.warmup.enabled:
                runtime.warmup(warmup_inputs(resolved, 1))
            seq2seq = Seq2SeqRunner(runtime, settings.max_num_seqs, settings.max_model_len)
            return resolved, seq2seq, seq2seq.description

    elif config.platform == "torch":
        # The only place the engine imports torch, and only for torch entries.
        from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

        torch_decoder = TorchDecoderRunner(model_path, config, gpu)
        close = torch_decoder.close

        def load_and_warm() -> tuple[ModelConfig, DecoderRunner, str]:
            nonlocal tensors
            torch_decoder.load()
            tensors = (torch_decoder.inputs, torch_decoder.outputs)
            resolved = resolve_tensors(config, *tensors)
            if config.warmup.enabled:
                torch_decoder.warmup()
            return resolved, torch_decoder, torch_decoder.description

    else:
        from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner

        decoder = OnnxDecoderRunner(model_path, config, gpu)
        runtimes.append(decoder.runtime)
        close = decoder.close

        def load_and_warm() -> tuple[ModelConfig, DecoderRunner, str]:
            decoder.load()
            resolved = resolve_tensors(config, decoder.runtime.inputs, decoder.runtime.outputs)
            if config.warmup.enabled:
                decoder.warmup()
            return resolved, decoder, decoder.description

    try:
        resolved, runner, description = await asyncio.to_thread(load_and_warm)
        engine = GenerationScheduler(name, settings, runner, metrics)
        await engine.start()
    except BaseException:
        close()
        raise
    return _Started(resolved, runtimes, description, engine=engine, tensors=tensors)
