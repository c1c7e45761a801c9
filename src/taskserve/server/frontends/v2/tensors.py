"""The v2 input checks every door makes, on tensors already out of their wire format.

The gRPC codec (grpc/codec.py) keeps its flat fast path for the common case and calls
these for everything else; the REST codec (http/v2_codec.py) calls ``decode_tensor`` and
``check_complete`` for every input. So a request gets the same refusal, word for word,
through either door. Every check raises InvalidInput naming the tensor, what was
expected and what came.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from taskserve.protocol.datatypes import V2_TO_NUMPY, deserialize_bytes_tensor, numpy_dtype
from taskserve.server.errors import InvalidInput, LimitExceeded, quoted
from taskserve.server.repository.config import ModelConfig, TensorConfig
from taskserve.server.settings import ServerSettings


def shape_matches(shape: tuple[int, ...], dims: tuple[int, ...]) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims, strict=True))


def expected_shape(config: ModelConfig, tensor: TensorConfig) -> list[int]:
    """The full shape callers must send, -1 for variable, batch dimension included."""
    return ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)


def check_shape(config: ModelConfig, spec: TensorConfig, shape: tuple[int, ...]) -> None:
    if any(s < 0 for s in shape):
        raise InvalidInput(f"input {spec.name!r}: shape {list(shape)} has a negative dimension")
    if config.max_batch_size > 0:
        if not shape or not shape_matches(shape[1:], spec.dims):
            raise InvalidInput(
                f"input {spec.name!r}: expected shape {expected_shape(config, spec)} "
                f"(batch dimension first), got {list(shape)}"
            )
        if shape[0] < 1 or shape[0] > config.max_batch_size:
            raise InvalidInput(
                f"input {spec.name!r}: batch size {shape[0]} is outside 1..{config.max_batch_size} "
                f"(max_batch_size of model {config.name!r})"
            )
    elif not shape_matches(shape, spec.dims):
        raise InvalidInput(f"input {spec.name!r}: expected shape {list(spec.dims)}, got {list(shape)}")


def check_utf8(name: str, array: np.ndarray) -> None:
    # ONNX string tensors hold UTF-8 text; arbitrary bytes cannot reach the model intact.
    for index, item in enumerate(array.reshape(-1)):
        try:
            bytes(item).decode("utf-8")
        except UnicodeDecodeError as err:
            raise InvalidInput(
                f"input {name!r}: element {index} is not valid UTF-8 ({err.reason} at byte {err.start}); "
                "BYTES inputs of ONNX models must be UTF-8 text"
            ) from None


def decode_raw(name: str, datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    """A tensor from its raw bytes (little-endian; BYTES as 4-byte length + bytes per element)."""
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            flat = deserialize_bytes_tensor(raw, count)
        except ValueError as err:
            raise InvalidInput(f"input {name!r}: {err}") from None
        return flat.reshape(shape)
    dtype = V2_TO_NUMPY.get(datatype) or numpy_dtype(datatype)  # the fallback raises, naming the type
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise InvalidInput(
            f"input {name!r}: raw contents hold {len(raw)} bytes, but shape {list(shape)} of {datatype} "
            f"needs {expected} bytes ({count} elements x {dtype.itemsize})"
        )
    return np.ndarray(shape, dtype, raw)  # a read-only view of the bytes, like frombuffer + reshape


def decode_values(name: str, datatype: str, shape: tuple[int, ...], values: Sequence[object]) -> np.ndarray:
    """A tensor from a flat list of values (JSON data); BYTES elements are bytes."""
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(f"input {name!r}: data holds {len(values)} elements, shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        array = np.empty(count, dtype=np.object_)
        array[:] = list(values)
        return array.reshape(shape)
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidInput(f"input {name!r}: unknown datatype {datatype[:20]!r}")
    try:
        return np.asarray(values, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError):
        raise InvalidInput(f"input {name!r}: data holds values that are not {datatype}") from None


def spec_of(config: ModelConfig, specs: Mapping[str, TensorConfig], name: str, datatype: str) -> TensorConfig:
    """The model's input ``name``, checked to be declared with ``datatype``."""
    spec = specs.get(name)
    if spec is None:
        raise InvalidInput(f"model {config.name!r} has no input {quoted(name)}; its inputs are {sorted(specs)}")
    if datatype != spec.datatype:
        raise InvalidInput(f"input {name!r}: expected datatype {spec.datatype}, got {quoted(datatype)}")
    return spec


def check_complete(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> None:
    """Every required input is there and all agree on the batch size."""
    missing = [t.name for t in config.inputs or () if t.name not in tensors and not t.optional]
    if missing:
        raise InvalidInput(f"model {config.name!r} needs inputs {missing}, which the request does not have")
    if config.max_batch_size > 0 and len(tensors) > 1:
        batch_sizes = {name: arr.shape[0] for name, arr in tensors.items()}
        if len(set(batch_sizes.values())) > 1:
            raise InvalidInput(f"inputs disagree on the batch size: {batch_sizes}")


def check_outputs(config: ModelConfig, names: Sequence[str]) -> tuple[str, ...]:
    """Requested output names, checked against the model's, without repeats."""
    known = {t.name for t in config.outputs or ()}
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(quoted(n) for n in unknown[:4])
        shown += f" and {len(unknown) - 4} more" if len(unknown) > 4 else ""
        raise InvalidInput(f"model {config.name!r} has no outputs {shown}; its outputs are {sorted(known)}")
    return tuple(dict.fromkeys(names))


def max_bytes_elements(config: ModelConfig) -> int:
    """The model's cap on the elements of one BYTES input (``limits.max_bytes_elements``, else
    the server's ``--max-bytes-elements``)."""
    return config.limits.max_bytes_elements or ServerSettings.max_bytes_elements


def check_bytes_elements(name: str, shape: Sequence[int], cap: int) -> None:
    """Before decoding: each BYTES element is a Python object, so the count is the cost."""
    count = math.prod(shape)
    if count > cap:
        raise LimitExceeded(
            f"input {name!r}: shape {list(shape)} has {count} BYTES elements, over the limit of "
            f"{cap}; send fewer per request, or raise limits.max_bytes_elements in "
            "config.yaml (--max-bytes-elements for the server)"
        )
