"""Where a model's instances run: instance groups per GPU, and whether those GPUs exist.

``gpus: [0, 1]`` with ``instance_count: 2`` places two instances on GPU 0 and two on GPU 1.
A model placed on a GPU this machine lacks fails to load with the reason (it is then
UNAVAILABLE) while the other models serve. GPUs are counted through NVML (the
``nvidia-ml-py`` package the GPU metrics use), honouring ``CUDA_VISIBLE_DEVICES``; no
CUDA library is imported for it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from taskserve.server.errors import ModelNotReady
from taskserve.server.repository.config import ModelConfig


@dataclass(frozen=True)
class Placement:
    """One instance: its index and the GPU it runs on (None: as the runtime config says,
    which may fall back to the CPU)."""

    index: int
    gpu: int | None


def instance_placements(config: ModelConfig) -> list[Placement]:
    if not config.gpus:
        return [Placement(i, None) for i in range(config.instance_count)]
    gpus = [gpu for gpu in config.gpus for _ in range(config.instance_count)]
    return [Placement(i, gpu) for i, gpu in enumerate(gpus)]


def _visible(total: int) -> int:
    """How many of ``total`` physical GPUs CUDA_VISIBLE_DEVICES leaves visible."""
    mask = os.environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return total
    count = 0
    for item in mask.split(","):
        item = item.strip()
        if not item:
            break
        if item.isdigit() and int(item) >= total:
            break  # CUDA stops at the first invalid id
        count += 1
    return min(count, total)


def nvml_gpu_count() -> int:
    """NVIDIA GPUs visible to this process; 0 without NVML, a driver or a GPU."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError: no driver
        return 0
    try:
        return _visible(int(pynvml.nvmlDeviceGetCount()))
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


# Replaced in tests to pretend a machine has GPUs (or has none).
gpu_counter: Callable[[], int] = nvml_gpu_count


def check_placements(config: ModelConfig, placements: list[Placement]) -> None:
    """Raise ModelNotReady, naming the GPUs, when an instance is placed on a missing GPU."""
    wanted = sorted({p.gpu for p in placements if p.gpu is not None})
    if not wanted:
        return
    count = gpu_counter()
    missing = [g for g in wanted if g >= count]
    if missing:
        have = "no NVIDIA GPU" if count == 0 else f"GPUs 0..{count - 1} only"
        raise ModelNotReady(
            f"model {config.name!r} is configured for GPU(s) {missing} (gpus: {list(config.gpus)}) but this "
            f"machine has {have}; remove 'gpus' from its config.yaml to serve it on the CPU, or run the server "
            "where those GPUs are"
        )
