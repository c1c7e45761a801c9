"""ONNX Runtime: one InferenceSession per model instance.

Execution providers come from the config in preference order (TensorRT, CUDA,
CPU) and are skipped when this onnxruntime build lacks them, so a GPU config
still loads on a CPU-only machine.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.server.errors import InputRejected, RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes import onnx_providers
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.runtimes.io_binding import IoBinder
from taskserve.server.runtimes.onnx_threads import (
    WIDE_SESSIONS,
    alone_threads,
    default_intra_op_threads,
    instance_threads,
    session_options,
)

__all__ = ["OnnxRuntime", "default_intra_op_threads"]

log = logging.getLogger(__name__)

# ONNX type strings -> v2 datatypes.
_ORT_TO_V2 = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

def _dim(d: object) -> int:
    return d if isinstance(d, int) and d > 0 else -1


def _as_text(array: np.ndarray) -> np.ndarray:
    """ONNX string tensors take Python str; BYTES arrive as UTF-8 bytes (checked by the front end)."""
    out = np.empty(array.shape, dtype=np.object_)
    out.reshape(-1)[:] = [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in array.reshape(-1)]
    return out


class OnnxRuntime(Runtime):
    def __init__(self, model_path: Path, config: ModelConfig, gpu: int | None = None) -> None:
        self.model_path = model_path
        self.config = config
        # The GPU this instance is placed on (instance groups); None: as runtime.device_id says.
        self.gpu = gpu
        self._binder: IoBinder | None = None
        self._session: object | None = None
        self._native: Any = None
        # The shared wide session a lone batch runs on (onnx_threads.py); None: none.
        self._wide: Any = None
        self._wide_key: tuple[Path, int] | None = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._output_names: list[str] = []
        self._text_inputs: frozenset[str] = frozenset()
        self.providers: list[str] = []

    @property
    def _shown(self) -> str:
        """The model file as callers may see it: ``<model>/<version>/<file>``."""
        return "/".join(self.model_path.parts[-3:])

    def load(self) -> None:
        import onnxruntime as ort

        if not self.model_path.is_file():
            raise RuntimeFailure(f"model file {self._shown} does not exist")
        rc = self.config.runtime
        threads = instance_threads(rc, self.config.instance_count)
        providers = onnx_providers.select_providers(
            self.config, ort.get_available_providers(), self.model_path, self.gpu
        )

        def open_session(intra_op_threads: int, alone: bool = False) -> Any:
            opts = session_options(ort, rc, intra_op_threads, alone)
            try:
                return ort.InferenceSession(str(self.model_path), sess_options=opts, providers=providers)
            except Exception as err:  # onnxruntime raises its own exception types
                # onnxruntime's message may hold absolute paths (a refused external-data file):
                # callers get it through caller_safe, which replaces them.
                raise RuntimeFailure(f"onnxruntime could not load {self._shown}: {err}") from err

        session = open_session(threads)
        self.providers = session.get_providers()
        onnx_providers.check_active(self.config, providers, self.providers, self.gpu)
        wide = alone_threads(rc, self.config.instance_count)
        if wide and self.providers[0] == "CPUExecutionProvider":
            self._wide_key = (self.model_path.resolve(), wide)
            shared = WIDE_SESSIONS.acquire(self._wide_key, lambda: open_session(wide, alone=True))
            self._wide = getattr(shared, "_sess", None)
        self._inputs = [
            TensorInfo(i.name, self._v2_type(i.type), tuple(_dim(d) for d in i.shape), _axis_names(i.shape))
            for i in session.get_inputs()
        ]
        self._outputs = [
            TensorInfo(o.name, self._v2_type(o.type), tuple(_dim(d) for d in o.shape)) for o in session.get_outputs()
        ]
        self._output_names = [o.name for o in self._outputs]
        # String inputs need str objects; for every other model the request's arrays go straight in.
        self._text_inputs = frozenset(t.name for t in self._inputs if t.datatype == "BYTES")
        # The C++ session behind the Python wrapper: its run() checks the feed itself, and the
        # wrapper's extra Python-side checks cost ~5 µs per call, a tenth of a tiny model's
        # whole server-side time. The wrapper stays the fallback if onnxruntime renames it.
        self._native = getattr(session, "_sess", None)
        self._session = session
        self._binder = self._io_binder(ort, session)
        log.info(
            "loaded %s with %s, %d intra-op threads%s", self.model_path, self.providers, threads,
            f" ({wide} when a batch computes alone)" if self._wide is not None else "",
        )  # fmt: skip

    def _io_binder(self, ort: Any, session: Any) -> IoBinder | None:
        """GPU sessions with numeric inputs run through I/O binding (runtimes/io_binding.py)."""
        rc = self.config.runtime
        if not (rc.io_binding and onnx_providers.uses_cuda(self.providers)) or self._text_inputs:
            return None
        device_id = rc.device_id if self.gpu is None else self.gpu
        return IoBinder(session, ort, self.config, "cuda", device_id, cuda_graphs=rc.cuda_graphs)

    def _v2_type(self, ort_type: str) -> str:
        try:
            return _ORT_TO_V2[ort_type]
        except KeyError:
            raise RuntimeFailure(f"{self._shown}: tensor type {ort_type} is not supported") from None

    @property
    def session(self) -> Any:
        """The loaded ``onnxruntime.InferenceSession`` (for runners that bind buffers themselves)."""
        if self._session is None:
            raise RuntimeFailure(f"{self._shown} is not loaded")
        return self._session

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        return self._run(self._native, inputs, output_names)

    def infer_alone(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        return self._run(self._wide if self._wide is not None else self._native, inputs, output_names)

    def _run(
        self, native: Any, inputs: dict[str, np.ndarray], output_names: list[str] | None
    ) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise RuntimeFailure(f"{self._shown} is not loaded")
        names = output_names or self._output_names
        feed = inputs
        if self._text_inputs:
            feed = {k: (_as_text(v) if v.dtype == np.object_ else v) for k, v in inputs.items()}
        try:
            if self._binder is not None:
                return self._binder.run(feed, names)
            if native is not None:
                results = native.run(names, feed, None)
            else:
                results = session.run(names, feed)  # type: ignore[attr-defined]
        except Exception as err:
            message = f"onnxruntime failed on {self.model_path.parent.parent.name}: {err}"
            # onnxruntime's INVALID_ARGUMENT status: the values are wrong (an index past a
            # Gather's table, a shape a node refuses), not the runtime.
            if type(err).__name__ == "InvalidArgument":
                raise InputRejected(message) from err
            raise RuntimeFailure(message) from err
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        if self._binder is not None:
            self._binder.close()
            self._binder = None
        # Both handles to the C++ session go: ``_native`` alone keeps its weights and arena
        # alive for as long as anything still references this runtime.
        self._session = None
        self._native = None
        self._wide = None
        if self._wide_key is not None:
            WIDE_SESSIONS.release(self._wide_key)
            self._wide_key = None

    @property
    def alone_width(self) -> int:
        """Intra-op threads a lone batch computes on (0: no wide session)."""
        return self._wide_key[1] if self._wide is not None and self._wide_key else 0

    @property
    def description(self) -> str:
        return f"onnxruntime {', '.join(self.providers)}"

    @property
    def on_gpu(self) -> bool:
        # The first active provider runs the graph; the CPU provider only takes what it lacks.
        return bool(self.providers) and self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def _axis_names(shape: list[Any]) -> tuple[str | None, ...]:
    """The graph's symbolic dim names (e.g. "sequence_length"), None for fixed or unnamed axes."""
    return tuple(d if isinstance(d, str) and d else None for d in shape)
