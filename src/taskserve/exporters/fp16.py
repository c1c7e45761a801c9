"""Half-precision ONNX graphs for GPU serving (inputs and outputs stay fp32)."""

from __future__ import annotations

from pathlib import Path

import onnx


def convert_fp16(src: Path, dst: Path) -> None:
    from onnxruntime.transformers.onnx_model import OnnxModel

    dst.parent.mkdir(parents=True, exist_ok=True)
    model = OnnxModel(onnx.load(str(src)))
    # keep_io_types: clients keep sending FP32; the casts sit at the graph's edges.
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
