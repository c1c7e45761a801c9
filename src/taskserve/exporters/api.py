"""Python API: one function per source, each running the full export pipeline.

Every function writes ``out/<name>/`` (config.yaml, ``<version>/model.onnx`` and the
task's files) and returns an ``ExportResult``; on failure it raises an ``ExportError``
and leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from taskserve.exporters.pipeline import ExportOptions, ExportResult, run_export
from taskserve.exporters.tasks import check_taskserve_task, resolve_hf_task


def export_hf(
    model: str | Path, task: str, out: Path, name: str, *, opset: int | None = None, **options: Any
) -> ExportResult:
    """Export a transformers model (local directory or hub id) for an optimum or taskserve task.

    ``options`` are ``ExportOptions`` fields: version, max_batch_size, optimize, quantize,
    fp16, tensorrt, atol, progress.
    """
    from taskserve.exporters.sources.hf import export_hf as source

    optimum_task, _ = resolve_hf_task(task)
    model_ref = str(model)
    return run_export(
        # Decoders export for the engine (ONNX: its graph; torch, Llama family only: a causal-lm entry
        # with a generation block, the cache on the device); others are refused at export.
        lambda work: source(model_ref, optimum_task, work, opset=opset),
        ExportOptions(out=Path(out), name=name, **options),
        f"{model_ref} ({optimum_task})",
    )


def export_sentence_transformer(
    model_dir: str | Path, out: Path, name: str, *, token_embeddings: bool = False, **options: Any
) -> ExportResult:
    """Export a sentence-transformers folder with pooling and normalization inside the graph."""
    from taskserve.exporters.sources.sentence_transformers import export_sentence_transformer as source

    directory = Path(model_dir)
    return run_export(
        lambda work: source(directory, work, token_embeddings=token_embeddings),
        ExportOptions(out=Path(out), name=name, **options),
        f"sentence-transformers {directory}",
    )


def export_torch_module(
    module: Any,
    example_inputs: Mapping[str, Any],
    out: Path,
    name: str,
    *,
    output_names: Sequence[str],
    task: str = "tensor",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    task_options: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    max_batch_size: int = 32,
    **options: Any,
) -> ExportResult:
    """Export any ``torch.nn.Module`` called as ``module(*example_inputs.values())``
    (positional, in the mapping's order; the keys name the graph inputs).

    Axis 0 of every input and output is the batch; axis 1 of 2-D integer inputs (token
    ids) is a variable sequence, unless ``dynamic_axes`` says otherwise.
    """
    from taskserve.exporters.sources.torch_module import export_module as source

    check_taskserve_task(task)
    return run_export(
        lambda work: source(
            module,
            dict(example_inputs),
            work,
            output_names=list(output_names),
            task=task,
            dynamic_axes=dynamic_axes,
            task_options=dict(task_options or {}),
            labels=list(labels) if labels else None,
            max_batch_size=max_batch_size,
        ),
        ExportOptions(out=Path(out), name=name, **options),
        f"torch module {type(module).__name__}",
    )


def export_onnx_file(
    path: str | Path,
    out: Path,
    name: str,
    *,
    task: str = "tensor",
    batched: bool = True,
    task_options: Mapping[str, Any] | None = None,
    labels: Sequence[str] | None = None,
    **options: Any,
) -> ExportResult:
    """Serve an existing ONNX file: checked to load and run, optimized, written as an entry."""
    from taskserve.exporters.sources.onnx_file import export_onnx_file as source

    onnx_path = Path(path)
    check_taskserve_task(task)
    return run_export(
        lambda work: source(
            onnx_path,
            work,
            task=task,
            batched=batched,
            task_options=dict(task_options or {}),
            labels=list(labels) if labels else None,
        ),
        ExportOptions(out=Path(out), name=name, **options),
        f"ONNX file {onnx_path.name}",
    )
