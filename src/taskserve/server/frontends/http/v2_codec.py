"""KServe v2 REST infer bodies <-> tensors: JSON tensors and the binary tensor data
extension (``Inference-Header-Content-Length``: the JSON header, then each binary
tensor's bytes in order, sized by its ``binary_data_size`` parameter).

Decoding checks every input with the checks the gRPC door makes (v2/tensors.py), so the
refusals read the same. An output goes back as binary when the request asks for it
(``binary_data_output`` for all, an output's ``binary_data`` for one); otherwise as JSON.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from taskserve.protocol.datatypes import serialize_bytes_tensor, v2_datatype
from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.v2.tensors import (
    check_bytes_elements,
    check_complete,
    check_outputs,
    check_shape,
    check_utf8,
    decode_raw,
    decode_values,
    max_bytes_elements,
    spec_of,
)
from taskserve.server.repository.config import ModelConfig

HEADER_LENGTH = "inference-header-content-length"
# Nesting of JSON data lists (one per dimension); more is refused before flattening.
MAX_RANK = 16
_SCALAR_PARAMETER = (bool, int, float, str)


@dataclass(frozen=True)
class RestInferRequest:
    id: str
    parameters: dict[str, object]
    tensors: dict[str, np.ndarray]
    # Requested outputs in order; None: all.
    outputs: tuple[str, ...] | None
    # Outputs to send as binary data.
    binary: frozenset[str]
    # Every output as binary (the request's binary_data_output).
    all_binary: bool

# Bodies up to this size are decoded on the event loop (a JSON parse of a few hundred KB);
# larger ones on the worker pool, as the gRPC door does with large tensors.
INLINE_BODY_BYTES = 256 * 1024


def _object(value: object, what: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return value


def parameters_of(value: object, what: str) -> dict[str, object]:
    """A parameters object: string keys, scalar values."""
    if value is None:
        return {}
    params = _object(value, what)
    for key, item in params.items():
        if not isinstance(item, _SCALAR_PARAMETER):
            raise InvalidInput(f"{what}.{key[:40]} must be a bool, number or string")
    return params


def split_body(body: bytes, header_length: str | None) -> tuple[object, bytes]:
    """The JSON header (parsed) and the binary data after it."""
    if header_length is None:
        head, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInput(
                f"Inference-Header-Content-Length {header_length[:20]!r} is not a length within the "
                f"{len(body)}-byte body"
            )
        head, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        return json.loads(head), binary
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInput(f"the request body is not valid JSON ({str(err)[:120]})") from None


def _flatten(data: object, name: str) -> list[object]:
    flat: list[object] = []
    stack: list[tuple[object, int]] = [(data, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= MAX_RANK:
                raise InvalidInput(f"input {name!r}: data nests deeper than {MAX_RANK} levels")
            stack.extend((x, depth + 1) for x in reversed(item))
        else:
            flat.append(item)
    return flat


def _shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_RANK:
        raise InvalidInput(f"input {name!r}: shape must be a list of at most {MAX_RANK} integers")
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInput(f"input {name!r}: shape must hold integers, got {str(value)[:60]}")
    return tuple(value)


def decode_request(body: bytes, header_length: str | None, config: ModelConfig) -> RestInferRequest:
    head, binary = split_body(body, header_length)
    request = _object(head, "the request body")
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inputs must be a non-empty list of tensors")
    specs = {t.name: t for t in config.inputs or ()}
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for index, item in enumerate(raw_inputs):
        tensor = _object(item, f"inputs[{index}]")
        name, datatype = tensor.get("name"), tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"inputs[{index}] needs a name and a datatype (strings)")
        spec = spec_of(config, specs, name, datatype)
        if name in tensors:
            raise InvalidInput(f"input {name!r} appears more than once")
        shape = _shape(tensor.get("shape"), name)
        check_shape(config, spec, shape)
        if datatype == "BYTES":
            check_bytes_elements(name, shape, max_bytes_elements(config))
        params = parameters_of(tensor.get("parameters"), f"input {name!r} parameters")
        size = params.get("binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {str(size)[:20]} does not fit the {len(binary) - offset} "
                    "binary bytes left in the body"
                )
            array = decode_raw(name, datatype, shape, binary[offset : offset + size])
            offset += size
        else:
            if "data" not in tensor:
                raise InvalidInput(f"input {name!r} has neither data nor a binary_data_size parameter")
            values = _flatten(tensor["data"], name)
            if datatype == "BYTES":
                if not all(isinstance(v, str) for v in values):
                    raise InvalidInput(f"input {name!r}: BYTES data must be strings in JSON")
                values = [str(v).encode("utf-8") for v in values]
            elif len(values) > math.prod(shape):
                raise InvalidInput(
                    f"input {name!r}: data holds {len(values)} elements, shape {list(shape)} needs {math.prod(shape)}"
                )
            array = decode_values(name, datatype, shape, values)
        if datatype == "BYTES":
            check_utf8(name, array)
        tensors[name] = array
    if offset != len(binary):
        raise InvalidInput(
            f"the body holds {len(binary) - offset} binary bytes that no input's binary_data_size covers"
        )
    check_complete(config, tensors)
    outputs, binary_outputs = _outputs(request.get("outputs"), config)
    params = parameters_of(request.get("parameters"), "parameters")
    request_id = request.get("id", "")
    return RestInferRequest(
        id=str(request_id)[:256],
        parameters=params,
        tensors=tensors,
        outputs=outputs,
        binary=binary_outputs,
        all_binary=params.get("binary_data_output") is True,
    )


def _outputs(value: object, config: ModelConfig) -> tuple[tuple[str, ...] | None, frozenset[str]]:
    if value is None:
        return None, frozenset()
    if not isinstance(value, list):
        raise InvalidInput("outputs must be a list of {name, parameters}")
    names: list[str] = []
    binary: set[str] = set()
    for index, item in enumerate(value):
        output = _object(item, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{index}] needs a name")
        names.append(name)
        if parameters_of(output.get("parameters"), f"output {name!r} parameters").get("binary_data") is True:
            binary.add(name)
    return (check_outputs(config, names) if names else None), frozenset(binary)


def _json_data(name: str, array: np.ndarray) -> list[object]:
    flat = array.reshape(-1)
    if array.dtype == np.object_:
        try:
            # ONNX Runtime gives string tensors as str, the tasks as bytes.
            return [x if isinstance(x, str) else bytes(x).decode("utf-8") for x in flat]
        except UnicodeDecodeError:
            raise InvalidInput(
                f"output {name!r} holds binary data that JSON cannot carry; ask for it with the binary data "
                "extension (the output's binary_data parameter, or binary_data_output)"
            ) from None
    values: list[object] = flat.tolist()
    return values


def encode_response(
    model_name: str, model_version: str, request: RestInferRequest, outputs: Mapping[str, np.ndarray]
) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary data, the JSON header's length."""
    described: list[dict[str, object]] = []
    chunks: list[bytes] = []
    for name in request.outputs or tuple(outputs):
        array = outputs[name]
        datatype = v2_datatype(array.dtype)
        entry: dict[str, object] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if request.all_binary or name in request.binary:
            data = (
                serialize_bytes_tensor(np.asarray(array, dtype=np.object_))
                if datatype == "BYTES"
                else np.ascontiguousarray(array).tobytes()
            )
            entry["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            entry["data"] = _json_data(name, array)
        described.append(entry)
    body: dict[str, object] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.id:
        body["id"] = request.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
