"""onnxruntime I/O binding for GPU sessions: one host-to-device copy per input and one
device-to-host copy per output per batch, into device buffers reused across batches.

Without binding, ``session.run`` allocates device memory for every input and output on
every call and copies synchronously in between. Here each input lands in a device
OrtValue kept per (name, shape, dtype) (batches of a length bucket repeat their shapes),
outputs are allocated on the device by onnxruntime and copied back together at the end.

CUDA graphs (``runtime.cuda_graphs``, onnxruntime's ``enable_cuda_graph``): a batch is
padded to a fixed bucket shape (graph_shapes.py); each shape gets its own graph id and
fixed input and output buffers, as a replayed graph reads and writes the addresses it was
captured with. Shapes beyond ``MAX_GRAPHS`` or that cannot be bucketed run uncaptured.

The device type is a parameter so the same code runs on the CPU provider in tests.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.graph_shapes import MAX_GRAPHS, bucket, graph_batch_sizes

log = logging.getLogger(__name__)

# Device input buffers kept per instance (least recently used dropped first).
MAX_BUFFERS = 64
# onnxruntime's run option: which captured graph to replay; -1 runs without capturing.
GRAPH_ID_KEY = "gpu_graph_id"


@dataclass
class _Graph:
    graph_id: int
    inputs: dict[str, Any]  # name -> OrtValue (fixed addresses)
    outputs: dict[str, Any]
    runs: int = 0


class IoBinder:
    """Runs one session with bound inputs and outputs. Not thread-safe (one per instance)."""

    def __init__(
        self, session: Any, ort: Any, config: ModelConfig, device: str = "cuda", device_id: int = 0,
        cuda_graphs: bool = False,
    ) -> None:  # fmt: skip
        self._session = session
        self._ort = ort
        self._config = config
        self._device = device
        self._device_id = device_id
        self._binding = session.io_binding()
        self._buffers: OrderedDict[tuple[str, tuple[int, ...], str], Any] = OrderedDict()
        self._graphs: dict[tuple[Any, ...], _Graph] = {}
        self._cuda_graphs = cuda_graphs
        # A session made with enable_cuda_graph captures every run unless told not to.
        self._skip = self._skip_capture() if cuda_graphs and device != "cpu" else None
        self._batch_sizes = graph_batch_sizes(
            config.max_batch_size, config.dynamic_batching.preferred_batch_sizes
        ) if config.max_batch_size > 0 else ()  # fmt: skip
        self.copies_in = 0  # host-to-device copies made (tests and metrics)
        self.graph_failure = ""

    def _buffer(self, name: str, array: np.ndarray) -> Any:
        key = (name, tuple(array.shape), array.dtype.str)
        value = self._buffers.get(key)
        if value is None:
            value = self._buffers[key] = self._allocate(array)
            if len(self._buffers) > MAX_BUFFERS:
                self._buffers.popitem(last=False)
        else:
            self._buffers.move_to_end(key)
        self._copy_in(value, array)
        return value

    def _allocate(self, like: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_shape_and_type(
            list(like.shape), like.dtype.type, self._device, self._device_id
        )

    def _copy_in(self, value: Any, array: np.ndarray) -> None:
        value.update_inplace(np.ascontiguousarray(array))
        self.copies_in += 1

    def run(self, feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        if self._cuda_graphs:
            bucketed = bucket(feed, self._config, self._batch_sizes)
            key = (bucketed.key, tuple(names)) if bucketed is not None else ()
            if bucketed is not None and (key in self._graphs or len(self._graphs) < MAX_GRAPHS):
                try:
                    return bucketed.cut(self._run_graph(key, bucketed.feed, names))
                except Exception as err:  # e.g. a graph with CPU nodes cannot be captured
                    self._cuda_graphs = False
                    self.graph_failure = f"{type(err).__name__}: {err}"
                    self._graphs.clear()
                    log.warning("model %s: CUDA graphs off, running uncaptured: %s", self._config.name, err)
        return self._run_plain(feed, names, self._skip)

    def _run_plain(self, feed: dict[str, np.ndarray], names: list[str], options: Any = None) -> dict[str, np.ndarray]:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, self._buffer(name, array))
        for name in names:
            binding.bind_output(name, self._device, self._device_id)
        self._session.run_with_iobinding(binding, options)
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def _skip_capture(self) -> Any:
        options = self._ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID_KEY, "-1")
        return options

    def _run_graph(self, key: tuple[Any, ...], feed: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
        graph = self._graphs.get(key)
        if graph is None:
            # First sight of this shape: an uncaptured run tells the output shapes, then
            # fixed buffers are made for the capture.
            first = self._run_plain(feed, names, self._skip)
            inputs = {n: self._allocate(a) for n, a in feed.items()}
            outputs = {n: self._allocate(a) for n, a in first.items()}
            self._graphs[key] = _Graph(len(self._graphs) + 1, inputs, outputs)
            return first
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in feed.items():
            self._copy_in(graph.inputs[name], array)
            binding.bind_ortvalue_input(name, graph.inputs[name])
        for name in names:
            binding.bind_ortvalue_output(name, graph.outputs[name])
        options = None
        if self._device != "cpu":
            options = self._ort.RunOptions()
            options.add_run_config_entry(GRAPH_ID_KEY, str(graph.graph_id))
        self._session.run_with_iobinding(binding, options)
        graph.runs += 1
        return {name: graph.outputs[name].numpy() for name in names}

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def close(self) -> None:
        self._buffers.clear()
        self._graphs.clear()
        self._binding = None
