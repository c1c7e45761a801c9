"""The ``task_options`` each typed task reads, as pydantic models: checked when a
model loads (unknown keys and wrong types refused with the reason), so a READY
model never fails its first request on a typo in config.yaml.

Keyed by the config.yaml ``task``. A task without an entry here is not checked
(its class reads its options itself, as before); add its keys when adding a task.

An option that names a file is typed ``ModelFile``: loading confines it (and the file
read when it is unset) to the model directory through ``resolve_inside``, so no task
option can make the server open a file outside it. ``file_options`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from taskserve.server.repository.paths import OutsideModelDir, resolve_inside


@dataclass(frozen=True)
class InModelDir:
    """Marker of a ``ModelFile`` option: a path relative to the model directory that must
    stay inside it, symlinks included; ``default`` is the file the task reads when unset."""

    default: str | None = None


def ModelFile(default: str | None = None) -> Any:  # noqa: N802  (used as a type in the tables)
    return Annotated[str, InModelDir(default)]


# Keys every task may read (tasks/base.py).
_BASE: dict[str, Any] = {
    "activation": Literal["softmax", "sigmoid", "none"],
    "id2label": dict[int | str, str],
    "output": str,
}
# Tokenizer keys (tasks/tokenization.py, tasks/text.py).
_TEXT: dict[str, Any] = {
    "tokenizer": ModelFile("tokenizer.json"),
    "max_length": int,
    "pad_token_id": int,
    "truncation": bool,
}
# Image preprocessing keys (tasks/vision.py, tasks/images.py; ``image`` is checked there).
_IMAGE: dict[str, Any] = {
    "image": dict[str, Any],
    "preprocessor_config": ModelFile("preprocessor_config.json"),
    "pixel_input": str,
}

TASK_OPTIONS: dict[str, dict[str, Any]] = {
    "text-classification": {**_TEXT, "top_k": int, "problem_type": str, "multi_label": bool},
    "token-classification": {**_TEXT, "aggregation_strategy": str, "ignore_labels": list[str]},
    "sentence-embedding": {
        **_TEXT, "pooling": str, "normalize": bool, "pooled_in_graph": bool, "embedding_output": str,
    },
    "question-answering": {
        **_TEXT, "top_k": int, "max_answer_length": int, "doc_stride": int, "start_output": str, "end_output": str,
    },
    "fill-mask": {**_TEXT, "top_k": int, "mask_token": str, "mask_token_id": int},
    "image-classification": {**_IMAGE, "top_k": int},
    "object-detection": {
        **_IMAGE, "box_format": str, "boxes_normalized": bool, "iou_threshold": float, "score_threshold": float,
        "max_detections": int, "no_object_class": bool, "logits_output": str, "boxes_output": str,
    },
    # ``segmentation`` is written by the exporter (the kind of masks) and read by clients.
    "image-segmentation": {**_IMAGE, "mask_output": str, "segmentation": str},
    "image-text-match": {
        **_IMAGE, **_TEXT, "logit_scale": float, "image_embeds_output": str, "text_embeds_output": str,
        "logits_output": str,
    },
    # ``num_layers`` is written by the exporter (describes the past key/values).
    "text-generation": {
        **_TEXT, "max_new_tokens": int, "max_new_tokens_limit": int, "max_concurrent_generations": int,
        "chat_template": ModelFile("chat_template.jinja"), "eos_token_id": int | list[int], "eos_token_ids": list[int],
        "generation_config": ModelFile("generation_config.json"), "num_layers": int,
        # The transform services (translation, summarization, text2text) on a decoder.
        "prompt_templates": dict[str, Any], "languages": list[str],
    },
    # An encoder-decoder: the encoder is its own entry (``encoder_model``, task tensor).
    "text2text-generation": {
        **_TEXT, "max_new_tokens": int, "max_new_tokens_limit": int, "max_concurrent_generations": int,
        "encoder_model": str, "decoder_start_token_id": int, "eos_token_id": int | list[int],
        "eos_token_ids": list[int], "generation_config": ModelFile("generation_config.json"), "num_layers": int,
        "prompt_templates": dict[str, Any], "languages": list[str],
    },
    # Written by the exporter (exporters/diffusion.py); ``parts`` names the other entries.
    "image-generation": {
        **_TEXT, "parts": dict[str, str], "latent_channels": int, "unet_in_channels": int,
        "vae_scale_factor": int, "scaling_factor": float | int, "size_multiple": int, "default_size": int,
        "max_pixels": int, "max_steps": int, "max_images": int, "default_scheduler": str,
        "scheduler_config": ModelFile("scheduler_config.json"), "max_concurrent_generations": int,
        # The size limit's inputs (tasks/diffusion/budget.py): measured by the exporter, and its budget.
        "attention_bytes": float | int, "attention_memory_budget": int,
    },
}  # fmt: skip


def _marker(annotation: Any) -> InModelDir | None:
    if get_origin(annotation) is Annotated:
        return next((m for m in get_args(annotation)[1:] if isinstance(m, InModelDir)), None)
    return None


def file_options(task: str) -> dict[str, InModelDir]:
    """``task``'s options that name a file (``ModelFile``), with their markers."""
    keys = {**_BASE, **TASK_OPTIONS.get(task, {})}
    return {key: marker for key, kind in keys.items() if (marker := _marker(kind)) is not None}


@cache
def options_model(task: str) -> type[BaseModel] | None:
    """The pydantic model of ``task``'s options; None for a task that declares none."""
    keys = TASK_OPTIONS.get(task)
    if keys is None:
        return None
    fields: dict[str, Any] = {k: (v | None, Field(default=None)) for k, v in {**_BASE, **keys}.items()}
    return create_model(
        f"TaskOptions_{task.replace('-', '_')}",
        __config__=ConfigDict(extra="forbid", strict=True),
        **fields,
    )


def _file_problems(task: str, options: dict[str, Any], model_dir: Path) -> list[str]:
    """Each file option (set, or its default file) that resolves outside ``model_dir``;
    the message names the option, never the path."""
    problems = []
    for key, marker in file_options(task).items():
        value = options.get(key, marker.default)
        if not isinstance(value, str):
            continue  # unset without a default, or a wrong type (reported by the model check)
        try:
            resolve_inside(model_dir, value, f"task_options.{key}")
        except OutsideModelDir:
            where = "" if key in options else f" (unset: its default {marker.default!r})"
            problems.append(
                f"task_options.{key}{where} must name a file inside the model directory: a relative path "
                "that stays inside it, symlinks included"
            )
    return problems


def options_problems(task: str, options: dict[str, Any], model_dir: Path | None = None) -> list[str]:
    """What is wrong with ``options`` for ``task`` (empty: nothing), one line per key.
    With ``model_dir``, file options are also confined to it (``ModelFile``)."""
    model = options_model(task)
    if model is None:
        return []
    problems = []
    try:
        model.model_validate(options)
    except ValidationError as err:
        known = sorted({**_BASE, **TASK_OPTIONS[task]})
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"task_options.{key} is not an option of task {task!r} (it reads {known})")
            elif e["loc"] and str(e["loc"][0]) in file_options(task):
                problems.append(f"task_options.{key}: {e['msg']}")  # a file option's value is not repeated
            else:
                problems.append(f"task_options.{key}: {e['msg']} (got {_short(e.get('input'))})")
    if model_dir is not None:
        problems += _file_problems(task, options, model_dir)
    return problems


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
