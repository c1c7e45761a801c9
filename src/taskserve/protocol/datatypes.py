"""KServe v2 datatypes: names, numpy dtypes and the raw BYTES wire encoding.

Shared by the server's codec and the clients; depends on numpy only.
"""

from __future__ import annotations

import struct

import numpy as np
import numpy.typing as npt

# v2 datatype name -> numpy dtype. BYTES tensors are numpy object arrays of ``bytes``.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}
NUMPY_TO_V2[np.dtype(np.bytes_)] = "BYTES"
NUMPY_TO_V2[np.dtype(np.str_)] = "BYTES"


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a v2 datatype name; KeyError names the bad type."""
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise KeyError(f"unknown datatype {datatype!r}; expected one of {', '.join(V2_TO_NUMPY)}") from None


def v2_datatype(dtype: np.dtype) -> str:
    """The v2 datatype name for a numpy dtype (unicode/bytes strings map to BYTES)."""
    dtype = np.dtype(dtype)
    if dtype.kind in ("U", "S"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise KeyError(f"numpy dtype {dtype} has no v2 datatype") from None


def element_size(datatype: str) -> int:
    """Bytes per element for fixed-size types; 0 for BYTES."""
    return 0 if datatype == "BYTES" else V2_TO_NUMPY[datatype].itemsize


def serialize_bytes_tensor(array: npt.NDArray[np.object_]) -> bytes:
    """Encode a BYTES tensor for raw contents: each element prefixed by its uint32 LE length."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item.encode("utf-8") if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def deserialize_bytes_tensor(buffer: bytes, count: int | None = None) -> npt.NDArray[np.object_]:
    """Decode raw BYTES contents into a flat object array; ValueError on a malformed buffer."""
    items: list[bytes] = []
    offset = 0
    view = memoryview(buffer)
    while offset < len(view):
        if count is not None and len(items) == count:
            # More data than the shape holds: stop here, the work stays bounded by the shape.
            raise ValueError(f"raw BYTES contents hold more than the {count} elements the shape needs")
        if offset + 4 > len(view):
            raise ValueError(f"truncated BYTES element length at byte {offset} of {len(view)}")
        (length,) = struct.unpack_from("<I", view, offset)
        offset += 4
        if offset + length > len(view):
            raise ValueError(f"BYTES element at byte {offset - 4} claims {length} bytes, {len(view) - offset} remain")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if count is not None and len(items) != count:
        raise ValueError(f"raw BYTES contents hold {len(items)} elements, the shape needs {count}")
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out
