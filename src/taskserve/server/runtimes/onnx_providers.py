"""onnxruntime execution providers: which to ask for, with what options, and whether the
session really got them.

Pure functions of the config and the provider list onnxruntime reports, so that the
choice and the fallback are tested on a CPU machine with made-up provider lists.

- Providers come from ``runtime.execution_providers`` in order; ones this onnxruntime
  build lacks are skipped (a GPU config still loads on a CPU machine), unless the
  instance is placed on a GPU (``gpus``): then a missing GPU provider is an error.
- onnxruntime-gpu quietly runs on the CPU when the CUDA provider's libraries fail to
  load; ``check_active`` turns that into an error for GPU-placed instances and a
  warning otherwise.
- TensorRT: fp16/int8, engine and timing caches in a writable directory, and
  optimization profiles from ``max_batch_size`` and the length buckets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig, TensorConfig

log = logging.getLogger(__name__)

PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
# Sequence length when a variable dim has no bucket edges and no task_options.max_length.
DEFAULT_MAX_LENGTH = 512

ProviderSpec = str | tuple[str, dict[str, object]]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """Min/opt/max shapes (batch dim included) per input for one TensorRT optimization profile."""

    shapes: dict[str, tuple[Shape, Shape, Shape]]


def _length_ranges(length_buckets: Sequence[int], max_length: int) -> list[tuple[int, int]]:
    """(lowest, highest) sequence length per profile: one per bucket, or one for all."""
    edges = [b for b in length_buckets if b < max_length] + [max_length]
    ranges, low = [], 1
    for edge in edges:
        ranges.append((low, edge))
        low = edge + 1
    return ranges


def derive_profiles(
    inputs: Sequence[TensorConfig], max_batch_size: int, length_buckets: Sequence[int], max_length: int
) -> list[Profile]:
    """One profile per length bucket: batch 1..max_batch_size (opt: max, what batches reach
    under load), variable dims from the bucket's lower to its upper edge (opt: the upper
    edge). Unbatched models get their batch-free shapes. Empty when no input has a shape
    to vary (TensorRT then needs no profile)."""
    if not inputs:
        return []
    batched = max_batch_size > 0
    has_variable = any(-1 in t.dims for t in inputs)
    ranges = _length_ranges(length_buckets, max_length) if has_variable else [(1, 1)]
    profiles = []
    for low, high in ranges:
        shapes: dict[str, tuple[Shape, Shape, Shape]] = {}
        for tensor in inputs:
            lo = [low if d == -1 else d for d in tensor.dims]
            hi = [high if d == -1 else d for d in tensor.dims]
            if batched:
                shapes[tensor.name] = ((1, *lo), (max_batch_size, *hi), (max_batch_size, *hi))
            else:
                shapes[tensor.name] = (tuple(lo), tuple(hi), tuple(hi))
        profiles.append(Profile(shapes))
    return profiles


def profile_options(profiles: Sequence[Profile]) -> dict[str, str]:
    """onnxruntime's TensorRT provider options for explicit profiles: each input once per
    profile, ``name:1x16,name:1x17`` (onnxruntime >= 1.15 reads repeats as further profiles)."""
    if not profiles:
        return {}
    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        out[key] = ",".join(
            f"{name}:{'x'.join(str(d) for d in shapes[i])}"
            for profile in profiles
            for name, shapes in sorted(profile.shapes.items())
        )
    return out


# Where engine and timing caches go when the model config sets no runtime.tensorrt.cache_dir:
# the model repository is often read-only (a volume, an image), so the chart points this
# at a writable volume.
ENGINE_CACHE_ENV = "TASKSERVE_ENGINE_CACHE_DIR"


def engine_cache_dir(model_path: Path, model_name: str) -> Path:
    """``$TASKSERVE_ENGINE_CACHE_DIR/<model>/<version>`` when set, else ``trt_cache`` beside the model file."""
    root = os.environ.get(ENGINE_CACHE_ENV)
    if root:
        return Path(root) / model_name / model_path.parent.name
    return model_path.parent / "trt_cache"


def tensorrt_cache_dir(config: ModelConfig, model_path: Path) -> Path:
    """The engine/timing cache directory, created and checked writable (TensorRT otherwise
    fails deep inside the first inference)."""
    configured = config.runtime.tensorrt.cache_dir
    cache = Path(configured).expanduser() if configured else engine_cache_dir(model_path, config.name)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RuntimeFailure(
            f"model {config.name!r}: cannot create the TensorRT cache directory runtime.tensorrt.cache_dir "
            f"({err.strerror or err}); set it to a writable directory"
        ) from None
    if not os.access(cache, os.W_OK | os.X_OK):
        raise RuntimeFailure(
            f"model {config.name!r}: the TensorRT cache directory (runtime.tensorrt.cache_dir) is not writable; "
            "set it to a directory the server can write"
        )
    return cache


def tensorrt_options(config: ModelConfig, cache: Path, device_id: int) -> dict[str, object]:
    trt = config.runtime.tensorrt
    options: dict[str, object] = {
        "device_id": device_id,
        "trt_fp16_enable": trt.fp16,
        "trt_int8_enable": trt.int8,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache),
        "trt_max_workspace_size": trt.max_workspace_mb * 1024 * 1024,
    }
    if trt.profiles_from_buckets and config.inputs:
        max_length = int(config.task_options.get("max_length", 0) or 0)
        buckets = config.dynamic_batching.length_buckets
        max_length = max_length or (buckets[-1] if buckets else DEFAULT_MAX_LENGTH)
        profiles = derive_profiles(config.inputs, config.max_batch_size, buckets, max_length)
        options.update(profile_options(profiles))
    return options


def cuda_options(config: ModelConfig, device_id: int) -> dict[str, object]:
    options: dict[str, object] = {"device_id": device_id}
    if config.runtime.cuda_graphs:
        options["enable_cuda_graph"] = "1"
    return options


def select_providers(
    config: ModelConfig, available: Sequence[str], model_path: Path, gpu: int | None = None
) -> list[ProviderSpec]:
    """The providers (with options) to create the session with, in preference order.

    ``gpu``: the GPU this instance is placed on (instance groups); then a GPU provider is
    required and the CPU is not a fallback."""
    rc = config.runtime
    device_id = rc.device_id if gpu is None else gpu
    chosen: list[ProviderSpec] = []
    for name in rc.execution_providers:
        ort_name = PROVIDER_NAMES[name]
        if ort_name not in available:
            continue
        if name == "tensorrt":
            chosen.append((ort_name, tensorrt_options(config, tensorrt_cache_dir(config, model_path), device_id)))
        elif name == "cuda":
            chosen.append((ort_name, cuda_options(config, device_id)))
        elif gpu is None:
            chosen.append(ort_name)
    if gpu is not None and not any(_name(p) in GPU_PROVIDERS for p in chosen):
        raise RuntimeFailure(
            f"model {config.name!r} is placed on GPU {gpu} but this onnxruntime build has no GPU provider "
            f"(it has {list(available)}); install onnxruntime-gpu instead of onnxruntime"
        )
    if not chosen:
        raise RuntimeFailure(
            f"none of the configured execution providers {list(rc.execution_providers)} is available "
            f"in this onnxruntime build (it has {list(available)}); add 'cpu' to runtime.execution_providers"
        )
    return chosen


def _name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


def check_active(
    config: ModelConfig, requested: Sequence[ProviderSpec], active: Sequence[str], gpu: int | None
) -> None:
    """onnxruntime drops a provider whose libraries fail to load and runs on the CPU; say so."""
    wanted = [_name(p) for p in requested if _name(p) in GPU_PROVIDERS]
    if not wanted or any(p in GPU_PROVIDERS for p in active):
        return
    message = (
        f"model {config.name!r}: onnxruntime could not start {wanted} (its CUDA/cuDNN/TensorRT libraries did "
        f"not load; the log above says which) and fell back to {list(active)}"
    )
    if gpu is not None:
        raise RuntimeFailure(message + "; install the CUDA libraries onnxruntime-gpu needs")
    log.warning("%s", message)


def uses_cuda(active: Sequence[str]) -> bool:
    """Whether the session's first provider computes on an NVIDIA GPU (then I/O binding pays)."""
    return bool(active) and active[0] in GPU_PROVIDERS
