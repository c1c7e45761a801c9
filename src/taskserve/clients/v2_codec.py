"""numpy <-> KServe v2 protobuf messages for the client side.

Requests always travel as ``raw_input_contents`` (one bytes blob per input, no
per-element protobuf encoding); responses are read from ``raw_output_contents``
or, from servers that answer with typed contents, from ``InferTensorContents``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from taskserve.protocol.datatypes import (
    deserialize_bytes_tensor,
    numpy_dtype,
    serialize_bytes_tensor,
    v2_datatype,
)
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb

ParameterValue = bool | int | float | str

# Which InferTensorContents field carries each datatype (FP16 travels raw only).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def set_parameter(target: pb.InferParameter, value: ParameterValue) -> None:
    # bool before int: bool is a subclass of int.
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        # int64 when it fits, the usual choice of v2 servers; larger values need uint64.
        if value <= 2**63 - 1:
            target.int64_param = value
        else:
            target.uint64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise TypeError(f"parameter value {value!r}: use bool, int, float or str")


def parameter_value(param: pb.InferParameter) -> ParameterValue:
    which = param.WhichOneof("parameter_choice")
    if which is None:
        raise ValueError("InferParameter has no value set")
    value: ParameterValue = getattr(param, which)
    return value


def _raw_bytes(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return serialize_bytes_tensor(array)
    # The wire format is little-endian, whatever this machine is.
    return np.asarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def encode_infer_request(
    model_name: str,
    inputs: Mapping[str, npt.ArrayLike],
    *,
    model_version: str = "",
    outputs: Sequence[str] | None = None,
    request_id: str = "",
    priority: int | None = None,
    queue_timeout_us: int | None = None,
    parameters: Mapping[str, ParameterValue] | None = None,
) -> pb.ModelInferRequest:
    """A ModelInferRequest with raw contents. ``priority`` and ``queue_timeout_us`` become the
    standard "priority" and "timeout" request parameters the dynamic batcher honours."""
    request = pb.ModelInferRequest(model_name=model_name, model_version=model_version, id=request_id)
    for name, value in inputs.items():
        array = np.asarray(value)
        datatype = v2_datatype(array.dtype.newbyteorder("="))  # byte order is fixed on the wire
        tensor = request.inputs.add(name=name, datatype=datatype)
        tensor.shape.extend(array.shape)
        request.raw_input_contents.append(_raw_bytes(array, datatype))
    for name in outputs or ():
        request.outputs.add(name=name)
    if priority is not None:
        if priority < 0:
            raise ValueError(f"priority must be >= 0 (0: the model's default), got {priority}")
        request.parameters["priority"].uint64_param = priority
    if queue_timeout_us is not None:
        if queue_timeout_us < 0:
            raise ValueError(f"queue_timeout_us must be >= 0, got {queue_timeout_us}")
        request.parameters["timeout"].int64_param = queue_timeout_us
    for key, val in (parameters or {}).items():
        set_parameter(request.parameters[key], val)
    return request


def _decode_typed(tensor: pb.ModelInferResponse.InferOutputTensor, shape: tuple[int, ...]) -> np.ndarray:
    field = _CONTENTS_FIELD.get(tensor.datatype)
    if field is None:
        raise ValueError(f"output {tensor.name!r}: datatype {tensor.datatype} can only travel as raw contents")
    values = getattr(tensor.contents, field)
    if tensor.datatype == "BYTES":
        out = np.empty(len(values), dtype=np.object_)
        out[:] = list(values)
        return out.reshape(shape)
    return np.asarray(values, dtype=numpy_dtype(tensor.datatype)).reshape(shape)


def decode_infer_response(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    """Output name -> array. Fixed-size arrays decoded from raw contents are read-only
    views of the response bytes (no copy); BYTES outputs are object arrays of ``bytes``."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise ValueError(f"response has {len(response.outputs)} outputs but {len(raw)} raw contents")
    result: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(response.outputs):
        shape = tuple(int(d) for d in tensor.shape)
        if not raw:
            result[tensor.name] = _decode_typed(tensor, shape)
        elif tensor.datatype == "BYTES":
            count = int(np.prod(shape, dtype=np.int64))
            result[tensor.name] = deserialize_bytes_tensor(raw[i], count).reshape(shape)
        else:
            dtype = numpy_dtype(tensor.datatype).newbyteorder("<")
            result[tensor.name] = np.frombuffer(raw[i], dtype=dtype).reshape(shape)
    return result
