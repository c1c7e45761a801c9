"""An existing ONNX file: checked, run once on generated inputs, then served as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from taskserve.exporters.errors import ExportError, UsageError
from taskserve.exporters.graph_io import read_graph_io, serving_specs
from taskserve.exporters.spec import ExportedModel, ValidationCase
from taskserve.exporters.tasks import check_taskserve_task
from taskserve.exporters.validate import open_session

_NP_TYPES = {
    "FP32": np.float32,
    "FP16": np.float16,
    "FP64": np.float64,
    "INT64": np.int64,
    "INT32": np.int32,
    "INT16": np.int16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "BOOL": np.bool_,
}


def generated_inputs(path: Path, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs matching the graph: symbolic dims -> ``batch`` (axis 0) or ``length``;
    masks are ones and integer inputs ids below 10."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for t in read_graph_io(path)[0]:
        shape = [d if isinstance(d, int) else (batch if i == 0 else length) for i, d in enumerate(t.shape)]
        dtype = _NP_TYPES.get(t.datatype)
        if dtype is None:
            raise ExportError(
                f"input {t.name!r} has type {t.datatype}; generated inputs support numeric types only"
            )
        if "mask" in t.name or dtype is np.bool_:
            feeds[t.name] = np.ones(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            feeds[t.name] = rng.integers(0, 10, size=shape).astype(dtype)  # valid ids for any vocab >= 10
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def export_onnx_file(
    path: Path,
    work: Path,
    *,
    task: str = "tensor",
    batched: bool = True,
    task_options: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    max_batch_size: int = 32,
) -> ExportedModel:
    check_taskserve_task(task)
    if not path.is_file():
        raise UsageError(f"ONNX file {path} does not exist")
    try:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
    except Exception as err:  # onnx raises ValidationError, DecodeError, ...
        raise ExportError(f"{path} is not a valid ONNX model: {str(err).strip().splitlines()[0]}") from None
    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True)
    target = onnx_dir / "model.onnx"
    # Re-saving pulls external weights next to the graph (one file when under 2 GB).
    onnx.save(model, str(target), save_as_external_data=model.ByteSize() >= 2**31)
    session = open_session(path)  # the original is the reference the copy is validated against
    cases = []
    for i, (batch, length) in enumerate([(1, 8), (3, 16)] if batched else [(1, 8)]):
        feeds = generated_inputs(target, batch, length, seed=i)
        try:
            values = session.run(None, feeds)
        except Exception as err:  # onnxruntime's own error types
            raise ExportError(
                f"{path.name} does not run on generated inputs: {str(err).splitlines()[0]}"
            ) from None
        expected = dict(zip([o.name for o in session.get_outputs()], values, strict=True))
        cases.append(ValidationCase("model.onnx", feeds, expected, f"generated#{i}"))
    inputs, outputs = serving_specs(target, batched=batched)
    return ExportedModel(
        work_dir=onnx_dir,
        task=task,
        onnx_files=["model.onnx"],
        cases=cases,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=max_batch_size if batched else 0,
        task_options=task_options or {},
        labels=labels,
        source={"kind": "onnx-file", "path": str(path)},
    )
