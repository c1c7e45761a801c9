"""PyTorch runtime (``platform: torch``): fp16/bf16 on CUDA, fp32 on CPU.

The only server module that imports torch (and transformers); ``create_runtime`` imports
it only for torch entries, so a server without torch serves everything else.

An entry's version directory holds ``torch_model.json`` (the ``default_model_filename``)
naming an architecture this module builds, plus its weights as safetensors:

- ``sentence-transformer``: a transformers encoder (``config.json`` + safetensors) with
  sentence-transformers' pooling and normalization; outputs ``sentence_embedding`` and
  optionally ``token_embeddings``.
- ``transformers``: ``AutoModel`` or an ``AutoModelFor...`` head; each output is the
  attribute of that name on the model's output (``logits``, ``last_hidden_state``, ...).
- ``efficientnet-lite0``: the module below, ``pixel_values`` -> ``logits``.

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
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig, TensorConfig
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.runtimes.graph_shapes import MAX_GRAPHS, bucket, graph_batch_sizes

log = logging.getLogger(__name__)

SPEC_FILE = "torch_model.json"
WEIGHTS_FILE = "model.safetensors"
SPEC_FORMAT = 1
ARCHITECTURES = ("sentence-transformer", "transformers", "causal-lm", "efficientnet-lite0")
AUTO_CLASSES = (
    "AutoModel",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "AutoModelForQuestionAnswering",
    "AutoModelForMaskedLM",
    "AutoModelForImageClassification",
    "AutoModelForCausalLM",
)
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


# -- EfficientNet-Lite0 (efficientnet_pytorch state-dict names) --------------------------

# (expand ratio, kernel, stride, output channels, repeats) per stage.
EFFICIENTNET_LITE0_BLOCKS = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "same" padding for a fixed input size (padding computed once)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, bias=False, groups=groups)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.same_pad = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)
        self.out_size = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = super().forward(F.pad(x, self.same_pad))
        return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int, size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv(cin, mid, 1, 1, size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv(mid, mid, kernel, stride, size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv(mid, cout, 1, 1, self._depthwise_conv.out_size)
        self._bn2 = _bn(cout)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        out: torch.Tensor = y + x if self.residual else y
        return out


class EfficientNetLite0(nn.Module):
    """Lite variant: ReLU6, no squeeze-excitation, TF "same" padding, BatchNorm eps 1e-3."""

    def __init__(self, num_classes: int = 1000, image_size: int = 224) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, 2, image_size)
        self._bn0 = _bn(32)
        size, cin, blocks = self._conv_stem.out_size, 32, []
        for expand, kernel, stride, cout, repeats in EFFICIENTNET_LITE0_BLOCKS:
            for i in range(repeats):
                block = MBConv(cin, cout, expand, kernel, stride if i == 0 else 1, size)
                blocks.append(block)
                size, cin = block.out_size, cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv(cin, 1280, 1, 1, size)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        logits: torch.Tensor = self._fc(x.mean(dim=(2, 3)))
        return logits


# -- modules built from an entry ---------------------------------------------------------


class SentenceEmbedding(nn.Module):
    """A transformers encoder plus the pooling/normalization sentence-transformers applies."""

    def __init__(self, encoder: nn.Module, pooling: tuple[str, ...], normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        lengths = mask.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.pooling:
            if mode == "cls":
                parts.append(tokens[:, 0])
            elif mode == "max":
                parts.append(torch.where(mask > 0, tokens, torch.full_like(tokens, -1e4)).max(dim=1).values)
            elif mode == "mean":
                parts.append((tokens * mask).sum(1) / lengths)
            elif mode == "mean_sqrt_len":
                parts.append((tokens * mask).sum(1) / lengths.sqrt())
            else:  # lasttoken, right padding
                last = (attention_mask.sum(1) - 1).clamp(min=0)
                parts.append(tokens[torch.arange(tokens.shape[0], device=tokens.device), last])
        embedding = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.normalize:
            # In fp32: fp16 squares of a 384-wide vector lose the norm's low bits.
            embedding = F.normalize(embedding.float(), p=2.0, dim=1).to(tokens.dtype)
        return {"sentence_embedding": embedding, "token_embeddings": tokens}


class HeadOutputs(nn.Module):
    """A transformers model whose output attributes are the served outputs."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(**inputs)
        return {name: getattr(out, name) for name in self.names}


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache, across transformers versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    return [(k, v) for k, v in legacy]


class CausalLMStep(nn.Module):
    """One step of a KV-cache decoder with the ONNX decoder's tensors: ``input_ids``,
    ``attention_mask`` (past + new), ``position_ids``, ``past_key_values.N.key/value`` in;
    ``logits`` and ``present.N.key/value`` out. The generation engine drives either alike."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        cache = None
        if self.layers and inputs["past_key_values.0.key"].shape[2] > 0:
            from transformers import DynamicCache

            cache = DynamicCache()
            for i in range(self.layers):
                cache.update(inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"], i)
        kwargs = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
        out = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], past_key_values=cache,
            use_cache=True, **kwargs,
        )  # fmt: skip
        result = {"logits": out.logits}
        for i, (key, value) in enumerate(_cache_layers(out.past_key_values)):
            result[f"present.{i}.key"], result[f"present.{i}.value"] = key, value
        return result


class NamedOutput(nn.Module):
    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module = module
        self.name = name

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.module(*inputs.values())}


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
