"""Any torch.nn.Module with example inputs, exported with the classic TorchScript-based
exporter (deterministic and independent of onnxscript) with dynamic batch/sequence axes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.errors import ExportError, UsageError
from taskserve.exporters.graph_io import serving_specs
from taskserve.exporters.quiet import quiet
from taskserve.exporters.spec import ExportedModel, ValidationCase
from taskserve.exporters.tasks import check_taskserve_task
from taskserve.exporters.torch_entry import module_entry


def default_dynamic_axes(inputs: Mapping[str, Any], output_names: list[str]) -> dict[str, dict[int, str]]:
    """Axis 0 is the batch everywhere; axis 1 of 2-D integer inputs (token ids) is the sequence."""
    import torch

    axes: dict[str, dict[int, str]] = {}
    for name, t in inputs.items():
        axes[name] = {0: "batch"}
        if t.ndim == 2 and not torch.is_floating_point(t):
            axes[name][1] = "sequence"
    for name in output_names:
        axes[name] = {0: "batch"}
    return axes


def _outputs(result: Any, names: list[str]) -> dict[str, np.ndarray]:
    if isinstance(result, Mapping):
        values = [result[n] for n in names]
    elif isinstance(result, (tuple, list)):
        values = list(result)
    else:
        values = [result]
    if len(values) != len(names):
        raise UsageError(f"the module returns {len(values)} outputs but {len(names)} output names were given")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values, strict=True)}


def _bigger_batch(inputs: dict[str, Any], batch: int, seed: int = 0) -> dict[str, Any]:
    """A second test batch: random floats of the same scale, integer inputs repeated."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in inputs.items():
        if torch.is_floating_point(t):
            scale = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 1.0
            out[name] = torch.randn((batch, *t.shape[1:]), generator=gen, dtype=t.dtype) * scale + float(
                t.mean()
            )
        else:
            reps = (batch + t.shape[0] - 1) // t.shape[0]
            out[name] = t.repeat(reps, *([1] * (t.ndim - 1)))[:batch]
    return out


def export_module(
    module: Any,
    example_inputs: dict[str, Any],
    work: Path,
    *,
    output_names: list[str],
    task: str = "tensor",
    dynamic_axes: Mapping[str, Mapping[int, str]] | None = None,
    task_options: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    max_batch_size: int = 32,
    opset: int = 17,
    source: dict[str, Any] | None = None,
) -> ExportedModel:
    import torch

    check_taskserve_task(task)
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if not example_inputs or not output_names:
        raise UsageError("give at least one example input and one output name")
    module = module.eval()
    tensors = {k: torch.as_tensor(v) for k, v in example_inputs.items()}
    axes = {k: dict(v) for k, v in (dynamic_axes or default_dynamic_axes(tensors, output_names)).items()}
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True)
    try:
        with quiet(), torch.inference_mode():
            torch.onnx.export(
                module,
                tuple(tensors.values()),
                str(onnx_dir / "model.onnx"),
                input_names=list(tensors),
                output_names=output_names,
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as err:  # the exporter raises many types; the message is what matters
        raise ExportError(f"torch.onnx.export failed for {type(module).__name__}: {err}") from None
    batches = [tensors] + ([_bigger_batch(tensors, 3)] if max_batch_size > 0 else [])
    cases = []
    for i, batch in enumerate(batches):
        with torch.inference_mode():
            expected = _outputs(module(*batch.values()), output_names)
        cases.append(
            ValidationCase("model.onnx", {k: v.numpy() for k, v in batch.items()}, expected, f"batch#{i}")
        )
    inputs, outputs = serving_specs(onnx_dir / "model.onnx", batched=max_batch_size > 0)
    if max_batch_size > 0 and any(axes.get(n, {}).get(0) is None for n in [*tensors, *output_names]):
        raise ExportError(
            "a batched model needs axis 0 dynamic for every input and output (see dynamic_axes)"
        )
    return ExportedModel(
        work_dir=onnx_dir,
        task=task,
        onnx_files=["model.onnx"],
        cases=cases,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size,
        task_options=task_options or {},
        labels=labels,
        source=source or {"kind": "torch-module", "class": type(module).__name__},
        torch_entry=module_entry(module),
    )
