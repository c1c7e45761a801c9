"""The ``task_options`` each typed task reads, as pydantic models: checked when a
model loads (unknown keys and wrong types refused with the reason), so a READY
model never fails its first request on a typo in config.yaml.

Keyed by the config.yaml ``task``. A task without an entry here is not checked
(its class reads its options itself, as before); add its keys when adding a task.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

# Keys every task may read (tasks/base.py).
_BASE: dict[str, Any] = {
    "activation": Literal["softmax", "sigmoid", "none"],
    "id2label": dict[int | str, str],
    "output": str,
}
# Tokenizer keys (tasks/tokenization.py, tasks/text.py).
_TEXT: dict[str, Any] = {
    "tokenizer": str,
    "max_length": int,
    "pad_token_id": int,
    "truncation": bool,
}
# Image preprocessing keys (tasks/vision.py, tasks/images.py; ``image`` is checked there).
_IMAGE: dict[str, Any] = {
    "image": dict[str, Any],
    "preprocessor_config": str,
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
        "chat_template": str, "eos_token_id": int | list[int], "eos_token_ids": list[int],
        "generation_config": str, "num_layers": int,
        # The transform services (translation, summarization, text2text) on a decoder.
        "prompt_templates": dict[str, Any], "languages": list[str],
    },
    # An encoder-decoder: the encoder is its own entry (``encoder_model``, task tensor).
    "text2text-generation": {
        **_TEXT, "max_new_tokens": int, "max_new_tokens_limit": int, "max_concurrent_generations": int,
        "encoder_model": str, "decoder_start_token_id": int, "eos_token_id": int | list[int],
        "eos_token_ids": list[int], "generation_config": str, "num_layers": int,
        "prompt_templates": dict[str, Any], "languages": list[str],
    },
}  # fmt: skip


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


def options_problems(task: str, options: dict[str, Any]) -> list[str]:
    """What is wrong with ``options`` for ``task`` (empty: nothing), one line per key."""
    model = options_model(task)
    if model is None:
        return []
    try:
        model.model_validate(options)
    except ValidationError as err:
        known = sorted({**_BASE, **TASK_OPTIONS[task]})
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            if e["type"] == "extra_forbidden":
                problems.append(f"task_options.{key} is not an option of task {task!r} (it reads {known})")
            else:
                problems.append(f"task_options.{key}: {e['msg']} (got {e.get('input')!r})")
        return problems
    return []
