"""task_options are typed per task (one options model each, paired with its task in
tasks/registry.py) and checked at load: unknown keys with the valid ones and the closest,
wrong types with the key and the type, out-of-range values and unknown choices before
anything of the model loads; the docs' option lists are generated from the same models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from taskserve.server.repository.config import ModelConfig
from taskserve.server.tasks.base import TaskConfigError
from taskserve.server.tasks.readiness import check_options

ROOT = Path(__file__).resolve().parents[2]


def _check(tmp_path: Path, task: str, options: dict[str, Any]) -> None:
    # A text-generation entry runs on the generation engine: its config carries a generation: block.
    shape: dict[str, Any] = (
        {"max_batch_size": 0, "generation": {}} if task == "text-generation" else {"max_batch_size": 4}
    )
    config = ModelConfig.model_validate({"name": "m", "task": task, **shape, "task_options": options})
    check_options(tmp_path, config)


def _refusal(tmp_path: Path, task: str, options: dict[str, Any]) -> str:
    with pytest.raises(TaskConfigError) as err:
        _check(tmp_path, task, options)
    return err.value.message


def test_a_typo_is_refused_with_the_closest_key_and_every_valid_one(tmp_path: Path) -> None:
    message = _refusal(tmp_path, "image-generation", {"max_step": 30})
    assert "task_options.max_step is not an option of task 'image-generation'; did you mean 'max_steps'?" in message
    for key in ("max_steps", "max_images", "default_scheduler", "scheduler_config", "attention_memory_budget"):
        assert key in message, message
    # No close key: no guess, still every valid key.
    message = _refusal(tmp_path, "text-classification", {"zzz": 1})
    assert "did you mean" not in message and "top_k" in message and "truncation" in message


def test_a_typo_inside_the_image_settings_is_refused_too(tmp_path: Path) -> None:
    """Before, ``image`` was any mapping and a misspelt key in it was ignored."""
    message = _refusal(tmp_path, "image-classification", {"image": {"size": [8, 8], "std_dev": [1, 1, 1]}})
    assert "task_options.image.std_dev is not an option of task_options.image; did you mean 'std'?" in message
    message = _refusal(tmp_path, "object-detection", {"image": {"size": [8, 8], "resize_mode": "fit"}})
    assert "task_options.image.resize_mode must be 'exact' | 'shortest_edge'" in message, message


def test_a_wrong_type_names_the_key_and_the_type_it_takes(tmp_path: Path) -> None:
    message = _refusal(tmp_path, "text-generation", {"max_new_tokens": "many"})
    assert "task_options.max_new_tokens must be int" in message and "'many'" in message, message
    message = _refusal(tmp_path, "object-detection", {"boxes_normalized": "yes"})
    assert "task_options.boxes_normalized must be bool" in message, message
    message = _refusal(tmp_path, "text-generation", {"eos_token_ids": [2, "x"]})
    assert "task_options.eos_token_ids.1 must be list[int]" in message, message


def test_out_of_range_values_and_unknown_choices_fail_at_load_not_at_first_use(tmp_path: Path) -> None:
    """These passed the load-time check before (a key the table knew, any int or str)."""
    for task, options, key in [
        ("text-generation", {"max_new_tokens": 0}, "max_new_tokens"),
        ("text-generation", {"max_concurrent_generations": -1}, "max_concurrent_generations"),
        ("image-generation", {"default_scheduler": "ddmi"}, "default_scheduler"),
        ("image-generation", {"max_pixels": 0}, "max_pixels"),
        ("object-detection", {"box_format": "xywh"}, "box_format"),
        ("object-detection", {"iou_threshold": 1.5}, "iou_threshold"),
        ("token-classification", {"aggregation_strategy": "longest"}, "aggregation_strategy"),
        ("text2text-generation", {"languages": []}, "languages"),
    ]:
        message = _refusal(tmp_path, task, options)
        assert f"task_options.{key} must be " in message, (task, message)


def test_messages_name_no_server_path(tmp_path: Path) -> None:
    secret = str(tmp_path / "elsewhere" / "tokenizer.json")
    message = _refusal(tmp_path, "text-classification", {"tokenizer": secret})
    assert "task_options.tokenizer" in message and str(tmp_path) not in message, message
    message = _refusal(tmp_path, "text-classification", {"tokenizer": 7, "top_k": 2})
    assert "task_options.tokenizer must be str" in message and str(tmp_path) not in message, message


def test_null_means_the_default_and_valid_options_pass(tmp_path: Path) -> None:
    from taskserve.server.tasks.generation_options import TextGenerationOptions

    _check(tmp_path, "text-generation", {"max_new_tokens": None, "max_length": 64, "eos_token_ids": [2]})
    options = TextGenerationOptions.model_validate({"max_new_tokens": None})
    assert options.max_new_tokens == 256 and options.max_concurrent_generations == 64
    _check(tmp_path, "image-generation", {"scaling_factor": 1, "default_scheduler": "euler", "parts": {"a": "b"}})
    _check(tmp_path, "tensor", {"anything": "goes"})  # v2 only: no typed task reads them


def test_tasks_read_typed_attributes_not_string_keys() -> None:
    """No ``option("key", default)`` or ``options.get("key")`` left in tasks/: each default
    lives in its options model, once."""
    import taskserve.server.tasks

    tasks = Path(taskserve.server.tasks.__file__).parent  # the code under test
    pattern = re.compile(r"\.option\(|options\.get\(|options\[\"")
    offenders = [
        f"{path.relative_to(tasks)}:{n}"
        for path in sorted(tasks.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, offenders


def test_the_docs_option_lists_are_generated_from_the_models() -> None:
    from taskserve.server.tasks.options_reference import render

    written = (ROOT / "docs" / "task-options.md").read_text()
    assert written == render(), (
        "docs/task-options.md is stale: python -m taskserve.server.tasks.options_reference > docs/task-options.md"
    )


def test_every_option_the_docs_name_is_one_a_task_reads() -> None:
    from taskserve.server.tasks.registry import ROWS

    keys = set().union(*(row.options.model_fields for row in ROWS))
    named = {
        (path.name, match.group(1))
        for path in sorted((ROOT / "docs").glob("*.md"))
        if path.name != "task-options.md"  # generated; quotes a typo on purpose
        for match in re.finditer(r"task_options\.(\w+)", path.read_text())
    }
    assert named and {(doc, key) for doc, key in named if key not in keys} == set()
