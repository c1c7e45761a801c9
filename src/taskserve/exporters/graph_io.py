"""Read an ONNX graph's inputs and outputs and turn them into served tensor specs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx

from taskserve.exporters.spec import TensorSpec

_ONNX_TO_V2: dict[int, str] = {
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.DOUBLE: "FP64",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.UINT16: "UINT16",
    onnx.TensorProto.UINT32: "UINT32",
    onnx.TensorProto.UINT64: "UINT64",
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.STRING: "BYTES",
}


@dataclass(frozen=True)
class GraphTensor:
    """A graph input/output; a dim is an int size or the symbolic name of a variable axis."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]


def _tensor(value: onnx.ValueInfoProto) -> GraphTensor:
    ttype = value.type.tensor_type
    dims: list[int | str] = []
    for i, d in enumerate(ttype.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or f"{value.name}_dim{i}")
    return GraphTensor(value.name, _ONNX_TO_V2.get(ttype.elem_type, "FP32"), tuple(dims))


def read_graph_io(path: Path) -> tuple[list[GraphTensor], list[GraphTensor]]:
    """Inputs (initializers excluded) and outputs, without loading the weights."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [_tensor(v) for v in model.graph.input if v.name not in initializers]
    return inputs, [_tensor(v) for v in model.graph.output]


def serving_specs(
    path: Path,
    batched: bool,
    pad_values: Mapping[str, float] | None = None,
    fixed_dims: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Specs for config.yaml: the batch dim dropped when ``batched``, variable dims as -1.

    An output whose non-batch axis has the same symbolic name as an input's axis (e.g.
    ``sequence_length``) gets ``unpad_like`` that input, so the batcher slices it back.
    """
    pad_values = pad_values or {}
    fixed_dims = fixed_dims or {}
    graph_inputs, graph_outputs = read_graph_io(path)
    start = 1 if batched else 0

    def dims(t: GraphTensor) -> tuple[int, ...]:
        if t.name in fixed_dims:
            return fixed_dims[t.name]
        return tuple(d if isinstance(d, int) else -1 for d in t.shape[start:])

    inputs = [
        TensorSpec(t.name, t.datatype, dims(t), pad_value=pad_values.get(t.name, 0)) for t in graph_inputs
    ]
    # Only axes the batcher pads (variable in the served input) can be un-padded.
    axis_owner: dict[str, str] = {}
    for t, spec in zip(graph_inputs, inputs, strict=True):
        for d, served in zip(t.shape[start:], spec.dims, strict=False):
            if batched and isinstance(d, str) and served == -1:
                axis_owner.setdefault(d, t.name)
    outputs = []
    for t in graph_outputs:
        owners = [axis_owner[d] for d in t.shape[start:] if isinstance(d, str) and d in axis_owner]
        outputs.append(TensorSpec(t.name, t.datatype, dims(t), unpad_like=owners[0] if owners else None))
    return inputs, outputs
