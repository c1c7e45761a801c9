"""TensorRT engine builds: optimization profiles, a timing cache and an engine cache.

``tensorrt`` is imported lazily; on a machine without it (or without a GPU) the build
stops with TensorRTUnavailable before any export work starts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from taskserve.exporters.errors import ExportError, TensorRTUnavailable
from taskserve.exporters.spec import TensorSpec

_INSTALL_HINT = (
    "install NVIDIA TensorRT ('pip install taskserve[gpu]') on a machine with an NVIDIA GPU, or export "
    "without --tensorrt: the ONNX entry is still served through onnxruntime's TensorRT/CUDA providers "
    "where they are available"
)


def require_tensorrt() -> ModuleType:
    """Import tensorrt and check a builder can start; raise TensorRTUnavailable otherwise."""
    try:
        import tensorrt  # type: ignore[import-not-found]
    except ImportError:
        raise TensorRTUnavailable(
            f"--tensorrt: NVIDIA TensorRT is not installed here; {_INSTALL_HINT}"
        ) from None
    try:
        tensorrt.Builder(tensorrt.Logger(tensorrt.Logger.ERROR))
    except Exception as err:  # no GPU or driver: TensorRT raises its own error types
        raise TensorRTUnavailable(
            f"--tensorrt: TensorRT cannot start a builder ({err}); {_INSTALL_HINT}"
        ) from None
    module: ModuleType = tensorrt
    return module


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Min/opt/max shapes per input (batch dim included) for one optimization profile."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]

    def to_json(self) -> dict[str, Any]:
        return {k: [list(s) for s in v] for k, v in sorted(self.shapes.items())}


def derive_profile(
    inputs: Sequence[TensorSpec], max_batch_size: int, max_length: int, opt_length: int
) -> Profile:
    """Batch 1 .. max_batch_size (opt: half of it, the batcher's typical size under load);
    variable dims (sequence) 1 .. max_length with opt ``opt_length``."""
    if max_batch_size < 1:
        raise ExportError("--tensorrt needs a batched model (max_batch_size >= 1)")
    opt_batch = max(1, max_batch_size // 2)
    shapes = {}
    for spec in inputs:
        mins, opts, maxs = [1], [opt_batch], [max_batch_size]
        for d in spec.dims:
            if d == -1:
                mins.append(1)
                opts.append(min(opt_length, max_length))
                maxs.append(max_length)
            else:
                mins.append(d)
                opts.append(d)
                maxs.append(d)
        shapes[spec.name] = (tuple(mins), tuple(opts), tuple(maxs))
    return Profile(shapes)


def cache_dir() -> Path:
    """Stable engine/timing cache location; TASKSERVE_TRT_CACHE overrides it."""
    default = Path.home() / ".cache" / "taskserve" / "tensorrt"
    return Path(os.environ.get("TASKSERVE_TRT_CACHE", default))


def build_engine(onnx_path: Path, profile: Profile, fp16: bool, workspace_mb: int, cache: Path) -> Path:
    """Build (or reuse from ``cache``) a serialized engine for ``onnx_path``; return its path."""
    trt = require_tensorrt()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(onnx_path.read_bytes())
    key.update(json.dumps([profile.to_json(), fp16, workspace_mb, trt.__version__]).encode())
    engine_path = cache / f"{key.hexdigest()[:24]}.plan"
    if engine_path.exists():
        return engine_path

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    # The timing cache is shared by every build on this machine: later builds skip tactic timing.
    timing_path = cache / "timing.cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.exists() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine for {onnx_path.name}; see the log above")
    _write_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
    _write_atomic(engine_path, bytes(memoryview(serialized)))
    return engine_path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
