"""Building raw v2 ModelInfer requests (the generated stubs, no client library)."""

from __future__ import annotations

import numpy as np

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb

_DATATYPES = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}


def infer_request(model: str, **arrays: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=_DATATYPES[array.dtype], shape=list(array.shape))
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def output_array(response: pb.ModelInferResponse, name: str) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name == name:
            dtype = {"FP32": np.float32, "INT64": np.int64}[out.datatype]
            return np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(list(out.shape))
    raise KeyError(name)
