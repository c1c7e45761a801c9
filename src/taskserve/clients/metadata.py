"""Server and model metadata as small frozen dataclasses (no protobuf in callers' hands)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    # Includes the batch dimension when the model batches; -1 marks a variable size.
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]

    @classmethod
    def from_proto(cls, msg: pb.ServerMetadataResponse) -> ServerMetadata:
        return cls(msg.name, msg.version, tuple(msg.extensions))


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_proto(cls, msg: pb.ModelMetadataResponse) -> ModelMetadata:
        def tensors(items: Iterable[pb.ModelMetadataResponse.TensorMetadata]) -> tuple[TensorMetadata, ...]:
            return tuple(TensorMetadata(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in items)

        return cls(msg.name, tuple(msg.versions), msg.platform, tensors(msg.inputs), tensors(msg.outputs))

    def input(self, name: str) -> TensorMetadata:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"model {self.name!r} has no input {name!r}; inputs: {[t.name for t in self.inputs]}")
