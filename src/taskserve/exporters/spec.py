"""What a source hands to the export pipeline: ONNX files, test cases and serving facts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from taskserve.exporters.torch_entry import TorchEntryWriter


@dataclass(frozen=True)
class TensorSpec:
    """One served input or output, as written to config.yaml (dims without the batch dim)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    pad_value: float = 0
    optional: bool = False
    unpad_like: str | None = None
    # Inputs: where the batcher pads (right, left, none); see the server's TensorConfig.
    padding: str = "right"

    def to_config(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "datatype": self.datatype, "dims": list(self.dims)}
        if self.pad_value:
            data["pad_value"] = self.pad_value
        if self.padding != "right":
            data["padding"] = self.padding
        if self.optional:
            data["optional"] = True
        if self.unpad_like:
            data["unpad_like"] = self.unpad_like
        return data


@dataclass(frozen=True)
class ValidationCase:
    """One ONNX file run on fixed inputs, with what the source model returned for them."""

    onnx_file: str  # relative to the export's work directory
    inputs: Mapping[str, np.ndarray]
    expected: Mapping[str, np.ndarray]
    label: str = ""


@dataclass(frozen=True)
class TransformerShape:
    """What onnxruntime's transformer optimizer needs to fuse attention."""

    model_type: str  # onnxruntime optimizer name: "bert", "gpt2", ...
    num_heads: int
    hidden_size: int


@dataclass
class ExportedModel:
    """The output of the export step. ``onnx_files[0]`` is the model file the server loads."""

    work_dir: Path
    task: str
    onnx_files: list[str]
    cases: list[ValidationCase]
    # None: let the server read them from the graph.
    inputs: list[TensorSpec] | None
    outputs: list[TensorSpec] | None
    # Largest batch the model supports; 0 when its inputs carry no shared batch dim.
    max_batch_size: int = 1
    task_options: dict[str, Any] = field(default_factory=dict)
    labels: list[str] | None = None
    # File name in the model directory -> file to copy there (tokenizer.json, ...).
    extra_files: dict[str, Path] = field(default_factory=dict)
    transformer: TransformerShape | None = None
    # What produced it, for export-info.json.
    source: dict[str, Any] = field(default_factory=dict)
    # config.yaml's generation block: the entry runs on the generation engine.
    generation: dict[str, Any] | None = None
    # config.yaml's runtime block, beside what the export options put there.
    runtime: dict[str, Any] = field(default_factory=dict)
    # Writes the files of a torch entry (--format torch); None: this model has none.
    torch_entry: TorchEntryWriter | None = None
