"""Task names: Hugging Face / optimum export tasks and the taskserve tasks they serve as."""

from __future__ import annotations

from typing import get_args

from taskserve.exporters.errors import UsageError
from taskserve.server.repository.config import Task

# optimum export task -> taskserve config task.
OPTIMUM_TO_TASKSERVE: dict[str, str] = {
    "feature-extraction": "sentence-embedding",
    "text-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "fill-mask": "fill-mask",
    "image-classification": "image-classification",
    "object-detection": "object-detection",
    "image-segmentation": "image-segmentation",
    "semantic-segmentation": "image-segmentation",
    "zero-shot-image-classification": "image-text-match",
    "text-generation-with-past": "text-generation",
    "text2text-generation-with-past": "text2text-generation",
}

# taskserve task -> the optimum task exported for it when the user names the taskserve task.
TASKSERVE_TO_OPTIMUM: dict[str, str] = {
    "sentence-embedding": "feature-extraction",
    "image-text-match": "zero-shot-image-classification",
    "text-generation": "text-generation-with-past",
    "text2text-generation": "text2text-generation-with-past",
}

TASKSERVE_TASKS: tuple[str, ...] = get_args(Task)

# Largest max-abs difference between the source model and the ONNX graph (fp32, CPU).
# Logits over large vocabularies and deep vision stacks accumulate more rounding.
TOLERANCES: dict[str, float] = {
    "tensor": 1e-4,
    "sentence-embedding": 1e-4,
    "text-classification": 1e-4,
    "token-classification": 1e-4,
    "question-answering": 1e-4,
    "fill-mask": 1e-3,
    "image-classification": 1e-3,
    "object-detection": 1e-3,
    "image-segmentation": 1e-3,
    "image-text-match": 1e-3,
    # Deep decoders on optimum's random KV cache: SmolLM2-135M's fp32 logits (magnitude ~35)
    # differ by up to ~1.3e-2 between PyTorch and onnxruntime, with every arg-max equal.
    "text-generation": 2e-2,
    "text2text-generation": 1e-3,
    # Each part of a diffusion pipeline (UNet, VAE, text encoder) on its own.
    "image-generation": 1e-3,
}

# Tasks whose outputs index a class list (labels.txt).
CLASSIFIER_TASKS = frozenset(
    {
        "text-classification",
        "token-classification",
        "image-classification",
        "object-detection",
        "image-segmentation",
    }
)
TEXT_TASKS = frozenset(
    {"sentence-embedding", "text-classification", "token-classification", "question-answering", "fill-mask"}
)
GENERATION_TASKS = frozenset({"text-generation", "text2text-generation"})


def resolve_hf_task(name: str) -> tuple[str, str]:
    """Accept an optimum task or a taskserve task; return (optimum task, taskserve task)."""
    # Taskserve names first: "text-generation" means the served kind, with a KV cache.
    if name in TASKSERVE_TO_OPTIMUM:
        return TASKSERVE_TO_OPTIMUM[name], name
    if name in OPTIMUM_TO_TASKSERVE:
        return name, OPTIMUM_TO_TASKSERVE[name]
    known = sorted(set(OPTIMUM_TO_TASKSERVE) | set(TASKSERVE_TO_OPTIMUM))
    raise UsageError(f"unknown task {name!r}; use one of: {', '.join(known)}")


def check_taskserve_task(name: str) -> str:
    if name not in TASKSERVE_TASKS:
        raise UsageError(f"unknown task {name!r}; use one of: {', '.join(TASKSERVE_TASKS)}")
    return name
