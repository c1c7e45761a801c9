"""PyTorch runtime (``platform: torch``): fp16/bf16 on CUDA, fp32 on CPU.

The only server module that imports torch (and transformers); ``create_runtime`` imports
it only for torch entries, so a server without torch serves everything else.

An entry's version directory holds ``torch_model.json`` (the ``default_model_filename``)
naming an architecture this module builds (the modules themselves are in
``taskserve.torch_modules``, shared with the exporters), plus its weights as safetensors:

- ``sentence-transformer``: a transformers encoder (``config.json`` + safetensors) with
  sentence-transformers' pooling and normalization; outputs ``sentence_embedding`` and
  optionally ``token_embeddings``.
- ``transformers``: ``AutoModel`` or an ``AutoModelFor...`` head; each output is the
  attribute of that name on the model's output (``logits``, ``last_hidden_state``, ...).
- ``efficientnet-lite0``: ``taskserve.torch_modules.efficientnet_lite0``, ``pixel_values`` -> ``logits``.

Config files and safetensors (not a pickled module or a ``torch.export`` program) load
with the torch/transformers of the GPU machine as well as those the entry was written
with. config.yaml declares the inputs and outputs (there is no graph to read them from).

On CUDA each instance has its own stream; inputs go through reused pinned host buffers,
one copy in and one copy out per batch. ``runtime.torch.cuda_graphs`` captures a graph per
bucket shape (graph_shapes.py); ``runtime.torch.compile`` wraps the module in torch.compile.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig, TensorConfig
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.runtimes.graph_shapes import MAX_GRAPHS, bucket, graph_batch_sizes
from taskserve.torch_modules.efficientnet_lite0 import EfficientNetLite0
from taskserve.torch_modules.entry_format import ARCHITECTURES, AUTO_CLASSES, SPEC_FILE, SPEC_FORMAT, WEIGHTS_FILE
from taskserve.torch_modules.served import CausalLMStep, HeadOutputs, NamedOutput, SentenceEmbedding

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_V2_TO_TORCH = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
}  # fmt: skip
_V2_TO_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}  # fmt: skip
# torch.set_num_threads is process-wide: the first CPU instance sets it.
_threads_lock = threading.Lock()
_threads_set = False
# Models load on concurrent threads, and transformers' from_pretrained builds modules under
# a process-wide meta-device context: a module built beside it would get meta parameters.
BUILD_LOCK = threading.Lock()


def read_spec(directory: Path, filename: str = SPEC_FILE) -> dict[str, Any]:
    path = directory / filename
    try:
        spec = json.loads(path.read_text())
    except FileNotFoundError:
        raise RuntimeFailure(f"torch entry file {filename} is missing from version {directory.name}") from None
    except (OSError, ValueError) as err:
        raise RuntimeFailure(f"torch entry file {filename} is not readable JSON: {err}") from None
    if not isinstance(spec, dict) or spec.get("architecture") not in ARCHITECTURES:
        raise RuntimeFailure(
            f"{filename}: 'architecture' must be one of {list(ARCHITECTURES)}; "
            "re-export the entry with taskserve-export"
        )
    if int(spec.get("format", 0)) > SPEC_FORMAT:
        raise RuntimeFailure(
            f"{filename} has format {spec.get('format')}, newer than this server reads ({SPEC_FORMAT})"
        )
    return spec


def spec_model_dir(directory: Path, spec: dict[str, Any]) -> Path:
    """The Hugging Face folder an entry's spec names (``model_dir``), inside its version directory."""
    return resolve_inside(directory, str(spec.get("model_dir", ".")), f"{SPEC_FILE} model_dir")


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def build_module(
    directory: Path, spec: dict[str, Any], output_names: tuple[str, ...], input_names: tuple[str, ...] = ()
) -> nn.Module:
    """The fp32 CPU module an entry describes, weights loaded strictly."""
    arch = spec["architecture"]
    if arch == "efficientnet-lite0":
        module = EfficientNetLite0(int(spec.get("num_classes", 1000)), int(spec.get("image_size", 224)))
        weights = resolve_inside(directory, str(spec.get("weights", WEIGHTS_FILE)), f"{SPEC_FILE} weights")
        module.load_state_dict(_load_weights(weights), strict=True)
        return NamedOutput(module, output_names[0]).eval()
    import transformers

    auto = spec.get("auto_class", "AutoModel")
    if auto not in AUTO_CLASSES:
        raise RuntimeFailure(f"{SPEC_FILE}: auto_class {auto!r} is not one of {list(AUTO_CLASSES)}")
    model_dir = spec_model_dir(directory, spec)
    model = getattr(transformers, auto).from_pretrained(str(model_dir), local_files_only=True)
    model = model.float().eval()
    if arch == "sentence-transformer":
        return SentenceEmbedding(model, tuple(spec["pooling"]), bool(spec.get("normalize", False))).eval()
    if arch == "causal-lm":
        layers = sum(1 for n in input_names if n.startswith("past_key_values.") and n.endswith(".key"))
        return CausalLMStep(model, layers).eval()
    return HeadOutputs(model, output_names).eval()


def set_cpu_threads(config: ModelConfig) -> None:
    """torch's intra-op threads, sized like an onnxruntime instance's; process-wide, so the
    first CPU instance sets them."""
    global _threads_set
    with _threads_lock:
        if not _threads_set:
            from taskserve.server.runtimes.onnx_threads import instance_threads

            torch.set_num_threads(instance_threads(config.runtime, config.instance_count))
            _threads_set = True


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


def choose_device(config: ModelConfig, gpu: int | None, cuda_available: bool) -> tuple[str, torch.dtype]:
    """(device, compute dtype) for one instance; pure so CPU tests cover the choice."""
    opts = config.runtime.torch
    if gpu is not None or opts.device == "cuda":
        if not cuda_available:
            raise RuntimeFailure(
                f"model {config.name!r} asks for CUDA (gpus or runtime.torch.device) but this torch has no usable "
                "GPU; set runtime.torch.device to 'cpu' or 'auto'"
            )
        device = f"cuda:{gpu if gpu is not None else config.runtime.device_id}"
    elif opts.device == "auto" and cuda_available:
        device = f"cuda:{config.runtime.device_id}"
    else:
        device = "cpu"
    if opts.dtype != "auto":
        dtype = _DTYPES[opts.dtype]
        if device == "cpu" and dtype == torch.float16:
            raise RuntimeFailure(f"model {config.name!r}: fp16 needs CUDA; use fp32 or bf16 on the CPU")
        return device, dtype
    return device, torch.float16 if device.startswith("cuda") else torch.float32


class TorchRuntime(Runtime):
    def __init__(self, model_path: Path, config: ModelConfig, gpu: int | None = None) -> None:
        self.model_path = model_path
        self.config = config
        self.gpu = gpu
        self.device = "cpu"
        self.dtype = torch.float32
        self._module: Callable[..., dict[str, torch.Tensor]] | None = None
        self._raw: nn.Module | None = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._specs: dict[str, TensorConfig] = {}
        self._out_types: dict[str, str] = {}
        self._stream: Any = None
        self._pinned: dict[str, torch.Tensor] = {}
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._batch_sizes: tuple[int, ...] = ()
        # Why CUDA graphs were turned off for this instance (a capture failed), if they were.
        self.graph_failure = ""

    # -- loading ---------------------------------------------------------------

    def load(self) -> None:
        config = self.config
        if not config.inputs or not config.outputs:
            raise RuntimeFailure(
                f"model {config.name!r}: platform 'torch' needs inputs and outputs declared in config.yaml "
                "(taskserve-export --format torch writes them)"
            )
        self.device, self.dtype = choose_device(config, self.gpu, torch.cuda.is_available())
        spec = read_spec(self.model_path.parent, self.model_path.name)
        batched = config.max_batch_size > 0
        prefix = (-1,) if batched else ()
        self._inputs = [TensorInfo(t.name, t.datatype, prefix + t.dims) for t in config.inputs]
        self._outputs = [TensorInfo(t.name, t.datatype, prefix + t.dims) for t in config.outputs]
        self._specs = {t.name: t for t in config.inputs}
        self._out_types = {t.name: t.datatype for t in config.outputs}
        try:
            with BUILD_LOCK:
                module = build_module(self.model_path.parent, spec, tuple(self._out_types), tuple(self._specs))
        except RuntimeFailure:
            raise
        except Exception as err:  # transformers/safetensors raise many types
            raise RuntimeFailure(
                f"model {config.name!r}: cannot build the torch module: {type(err).__name__}: {err}"
            ) from err
        if self.device == "cpu":
            set_cpu_threads(self.config)
        else:
            torch.cuda.set_device(torch.device(self.device))
            self._stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._raw = module.to(device=self.device, dtype=self.dtype)
        self._module = torch.compile(self._raw) if config.runtime.torch.compile else self._raw
        if batched:
            self._batch_sizes = graph_batch_sizes(config.max_batch_size, config.dynamic_batching.preferred_batch_sizes)
        log.info("loaded %s on %s (%s)", config.name, self.device, str(self.dtype).removeprefix("torch."))


    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    # -- execution -------------------------------------------------------------

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self._stream is None:
            tensor = host
        else:
            # A reused pinned buffer, grown as needed: the copy to the device is then async.
            buffer = self._pinned.get(name)
            if buffer is None or buffer.numel() < host.numel() or buffer.dtype != host.dtype:
                buffer = torch.empty(max(host.numel(), 1), dtype=host.dtype).pin_memory()
                self._pinned[name] = buffer
            staged = buffer[: host.numel()].view(host.shape)
            staged.copy_(host)
            tensor = staged.to(self.device, non_blocking=True)
        if tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        return tensor

    def _forward(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self._module is not None
        return self._module(**tensors)

    def _to_host(self, outputs: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
        result = {}
        for name in names:
            if name not in outputs:
                raise RuntimeFailure(f"model {self.config.name!r} has no output {name!r}")
            wanted = _V2_TO_TORCH.get(self._out_types.get(name, "FP32"), torch.float32)
            result[name] = outputs[name].to(wanted).cpu().numpy()
        return result

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        if self._module is None:
            raise RuntimeFailure(f"model {self.config.name!r} is not loaded")
        names = output_names or list(self._out_types)
        unknown = [n for n in inputs if n not in self._specs]
        if unknown:
            raise RuntimeFailure(f"model {self.config.name!r} has no input(s) {unknown}")
        try:
            with torch.inference_mode():
                if self._stream is None:
                    return self._to_host(self._forward({n: self._to_device(n, a) for n, a in inputs.items()}), names)
                # The instance's device and stream on whichever thread runs the batch.
                with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                    if self.config.runtime.torch.cuda_graphs and not self.graph_failure:
                        result = self._run_graph(inputs, names)
                        if result is not None:
                            return result
                    tensors = {n: self._to_device(n, a) for n, a in inputs.items()}
                    result = self._to_host(self._forward(tensors), names)
                    return result
        except RuntimeFailure:
            raise
        except Exception as err:
            raise RuntimeFailure(f"torch failed on model {self.config.name!r}: {type(err).__name__}: {err}") from err

    def _run_graph(self, inputs: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray] | None:
        """Replay (or capture) the CUDA graph of this batch's bucket shape; None: not graphable."""
        bucketed = bucket(inputs, self.config, self._batch_sizes)
        if bucketed is None:
            return None
        key = bucketed.key
        graph = self._graphs.get(key)
        if graph is None:
            if len(self._graphs) >= MAX_GRAPHS:
                return None
            try:
                graph = self._capture({n: self._to_device(n, a) for n, a in bucketed.feed.items()})
            except Exception as err:  # e.g. a model that syncs with the host inside forward
                self.graph_failure = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                log.warning("model %s: CUDA graph capture failed, running eagerly: %s", self.config.name, err)
                torch.cuda.synchronize()
                return None
            self._graphs[key] = graph
        else:
            for name, array in bucketed.feed.items():
                graph.inputs[name].copy_(self._to_device(name, array))
        graph.graph.replay()
        return bucketed.cut(self._to_host(graph.outputs, names))

    def _capture(self, static: dict[str, torch.Tensor]) -> _Graph:
        # Warm-up on the side stream first: lazy inits (cuBLAS handles, workspaces) may not
        # happen during capture.
        assert self._stream is not None
        for _ in range(2):
            self._forward(static)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            outputs = self._forward(static)
        return _Graph(graph, static, outputs)

    def close(self) -> None:
        on_cuda = self._stream is not None
        self._graphs.clear()
        self._pinned.clear()
        self._module = None
        self._raw = None
        self._stream = None
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    @property
    def description(self) -> str:
        return f"torch {torch.__version__} {self.device} {str(self.dtype).removeprefix('torch.')}"

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"


class TorchDeviceMemory:
    """Device buffers and a stream from torch's CUDA caching allocator, for runtimes that
    do not use torch themselves (the native TensorRT runtime)."""

    def __init__(self, device_id: int) -> None:
        if not torch.cuda.is_available():
            raise RuntimeFailure("no CUDA device is usable by torch here; TensorRT engines need an NVIDIA GPU")
        self.device = torch.device("cuda", device_id)
        self._stream: Any = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]

    @property
    def stream(self) -> int:
        return int(self._stream.cuda_stream)

    def to_device(self, array: np.ndarray) -> tuple[Any, int]:
        host = torch.from_numpy(np.ascontiguousarray(array)).pin_memory()
        with torch.cuda.stream(self._stream):
            tensor = host.to(self.device, non_blocking=True)
        return (tensor, host), int(tensor.data_ptr())

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, int]:
        tensor = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype, device=self.device)
        return tensor, int(tensor.data_ptr())

    def to_host(self, buffer: Any) -> np.ndarray:
        with torch.cuda.stream(self._stream):
            host = buffer.to("cpu", non_blocking=True)
        self._stream.synchronize()
        array: np.ndarray = host.numpy()
        return array

    def close(self) -> None:
        self._stream.synchronize()
        torch.cuda.empty_cache()
