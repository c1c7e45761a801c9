"""KServe v2 messages <-> numpy tensors, with the input checks the protocol needs.

Every check names the tensor, what was expected and what was received, and
raises InvalidInput (INVALID_ARGUMENT); what the caller sent is quoted with a short cap.
Work per element is bounded by the declared shape, checked first, and BYTES inputs (a
Python object per element) by ``limits.max_bytes_elements``; requests whose declared
tensors are large enough to take time are decoded on the worker pool, never on the event
loop (``decode_small_inputs`` answers None for them, before touching their contents).
"""

from __future__ import annotations

import math

import numpy as np

from taskserve.protocol.datatypes import (
    V2_TO_NUMPY,
    numpy_dtype,
    serialize_bytes_tensor,
    v2_datatype,
)
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.server.errors import InvalidInput, quoted
from taskserve.server.frontends.v2 import tensors
from taskserve.server.frontends.v2.tensors import check_shape as _check_shape
from taskserve.server.frontends.v2.tensors import check_utf8 as _check_utf8
from taskserve.server.repository.config import ModelConfig, TensorConfig

# Tensors the event loop decodes itself: raw contents of fixed-size types up to this many
# bytes (a view and a copy), and up to INLINE_ELEMENTS elements where each element is Python
# work (BYTES, typed contents). Anything larger goes to the worker pool: a thread hop costs
# less than holding every other caller.
INLINE_RAW_BYTES = 1 << 20
INLINE_ELEMENTS = 1024

# Typed-contents field per datatype. FP16 (and BF16) have none: raw only, as in the spec.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# The common output dtypes, looked up without v2_datatype's normalisation.
_DATATYPES = {np.dtype(t): v2_datatype(np.dtype(t)) for t in (np.float32, np.float16, np.int64, np.int32, np.bool_)}


def _shape_ok(shape: tuple[int, ...], dims: tuple[int, ...], max_batch_size: int) -> bool:
    """The common case of ``_check_shape`` in one pass, without building messages."""
    if max_batch_size > 0:
        if len(shape) != len(dims) + 1 or not 1 <= shape[0] <= max_batch_size:
            return False
        shape = shape[1:]
    elif len(shape) != len(dims):
        return False
    if shape == dims:
        return True  # no variable dims (or they match literally): one tuple comparison
    for s, d in zip(shape, dims, strict=True):
        if s != d and (d != -1 or s < 0):
            return False
    return True


def _decode_raw(spec: TensorConfig, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    return tensors.decode_raw(spec.name, datatype, shape, raw)


def _decode_typed(
    spec: TensorConfig, datatype: str, shape: tuple[int, ...], contents: pb.InferTensorContents
) -> np.ndarray:
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"input {spec.name!r}: {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {spec.name!r}: {field} holds {len(values)} elements, shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=np.object_)
        arr[:] = list(values)
        return arr.reshape(shape)
    return np.asarray(values, dtype=numpy_dtype(datatype)).reshape(shape)


class _Inputs:
    """A model's input specs by name, with what decoding raw contents needs per input."""

    __slots__ = ("config", "specs", "raw", "max_bytes_elements")

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.max_bytes_elements = tensors.max_bytes_elements(config)
        self.specs = {t.name: t for t in config.inputs or ()}
        # name -> (datatype, dims, numpy dtype, item size) for fixed-size datatypes.
        self.raw = {
            t.name: (t.datatype, t.dims, V2_TO_NUMPY[t.datatype], V2_TO_NUMPY[t.datatype].itemsize)
            for t in config.inputs or ()
            if t.datatype != "BYTES"
        }


# Per config object (looked up for every request; configs are few).
_INPUTS: dict[int, _Inputs] = {}


def _inputs_of(config: ModelConfig) -> _Inputs:
    cached = _INPUTS.get(id(config))
    if cached is not None and cached.config is config:
        return cached
    if len(_INPUTS) > 256:
        _INPUTS.clear()  # many reloads: forget configs of unloaded models
    cached = _INPUTS[id(config)] = _Inputs(config)
    return cached


def decode_inputs(request: pb.ModelInferRequest, config: ModelConfig) -> dict[str, np.ndarray]:
    """Check a ModelInfer request against the model's inputs and return its tensors
    (blocking for large tensors: call it on a worker thread when ``decode_small_inputs`` declines)."""
    tensors = _decode(request, config, inline=False)
    assert tensors is not None  # only the inline pass declines
    return tensors


def decode_small_inputs(request: pb.ModelInferRequest, config: ModelConfig) -> dict[str, np.ndarray] | None:
    """``decode_inputs`` for the event loop: None, before any contents are touched, when a
    tensor declares more than the loop may decode (INLINE_RAW_BYTES, INLINE_ELEMENTS)."""
    return _decode(request, config, inline=True)


def _decode(request: pb.ModelInferRequest, config: ModelConfig, inline: bool) -> dict[str, np.ndarray] | None:
    """Raw contents of fixed-size types (what every client sends) take the flat loop
    below: every request of every model passes here, so each check is one comparison
    and anything unusual goes through ``_decode_one``, which names what is wrong.
    """
    table = _inputs_of(config)
    inputs = request.inputs
    raw = request.raw_input_contents
    tensors: dict[str, np.ndarray] = {}
    if raw:
        if len(raw) != len(inputs):
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries but the request has {len(inputs)} inputs; "
                "send one entry per input, in order"
            )
        max_batch_size = config.max_batch_size
        fixed = table.raw
        for index, tensor in enumerate(inputs):
            name = tensor.name  # each read of a message field builds a new str
            entry = fixed.get(name)
            shape = tuple(tensor.shape)
            count = math.prod(shape)
            if entry is None or name in tensors:
                if inline and count > INLINE_ELEMENTS:
                    return None
                tensors[name] = _decode_one(table, tensor, raw[index], tensors)  # BYTES, or an error to explain
                continue
            datatype, dims, dtype, itemsize = entry
            if inline and count * itemsize > INLINE_RAW_BYTES:
                return None
            data = raw[index]  # a copy: after the size check
            if (
                tensor.datatype != datatype
                or not _shape_ok(shape, dims, max_batch_size)
                or len(data) != count * itemsize
                or tensor.HasField("contents")
            ):
                tensors[name] = _decode_one(table, tensor, data, tensors)  # raises, naming what is wrong
                continue
            tensors[name] = np.ndarray(shape, dtype, data)  # a read-only view of the bytes
    else:
        for tensor in inputs:
            if inline and math.prod(tensor.shape) > INLINE_ELEMENTS:
                return None
            tensors[tensor.name] = _decode_one(table, tensor, None, tensors)
    specs = table.specs
    if len(tensors) != len(specs):
        missing = [name for name, spec in specs.items() if name not in tensors and not spec.optional]
        if missing:
            raise InvalidInput(f"model {config.name!r} needs inputs {missing}, which the request does not have")
    if config.max_batch_size > 0 and len(tensors) > 1:
        batch_sizes = {name: arr.shape[0] for name, arr in tensors.items()}
        if len(set(batch_sizes.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {batch_sizes}")
    return tensors


def _decode_one(
    table: _Inputs, tensor: pb.ModelInferRequest.InferInputTensor, data: bytes | None, seen: dict[str, np.ndarray]
) -> np.ndarray:
    """Every check on one input, with the message that names what is wrong."""
    config = table.config
    name, datatype = tensor.name, tensor.datatype
    spec = table.specs.get(name)
    if spec is None:
        raise InvalidInput(f"model {config.name!r} has no input {quoted(name)}; its inputs are {sorted(table.specs)}")
    if name in seen:
        raise InvalidInput(f"input {name!r} appears more than once")
    if datatype != spec.datatype:
        raise InvalidInput(f"input {name!r}: expected datatype {spec.datatype}, got {quoted(datatype)}")
    shape = tuple(tensor.shape)
    if not _shape_ok(shape, spec.dims, config.max_batch_size):
        _check_shape(config, spec, shape)  # raises, naming what is wrong
    if datatype == "BYTES":
        tensors.check_bytes_elements(name, shape, table.max_bytes_elements)
    if data is None:
        array = _decode_typed(spec, datatype, shape, tensor.contents)
    else:
        if tensor.HasField("contents"):
            raise InvalidInput(f"input {name!r}: send data either in contents or raw_input_contents, not both")
        array = _decode_raw(spec, datatype, shape, data)
    if datatype == "BYTES":
        _check_utf8(name, array)
    return array


def requested_outputs(request: pb.ModelInferRequest, config: ModelConfig) -> tuple[str, ...] | None:
    if not request.outputs:
        return None
    return tensors.check_outputs(config, [o.name for o in request.outputs])


def int_parameter(params: object, key: str) -> int | None:
    """An integer request parameter (int64 or uint64), None when absent."""
    param = params.get(key)  # type: ignore[attr-defined]
    if param is None:
        return None
    which = param.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"parameter {key!r} must be an integer (int64_param or uint64_param), got {which}")
    value = int(getattr(param, which))
    if value < 0:
        raise InvalidInput(f"parameter {key!r} must not be negative, got {value}")
    return value


def encode_outputs(
    response: pb.ModelInferResponse, outputs: dict[str, np.ndarray], order: tuple[str, ...] | None
) -> None:
    """Append outputs as raw contents (what Triton does over gRPC), in requested order."""
    for name in order or tuple(outputs):
        array = outputs[name]
        datatype = _DATATYPES.get(array.dtype) or v2_datatype(array.dtype)
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        if datatype == "BYTES":
            response.raw_output_contents.append(serialize_bytes_tensor(np.asarray(array, dtype=np.object_)))
        else:
            response.raw_output_contents.append(array.tobytes())  # C order whatever the layout
