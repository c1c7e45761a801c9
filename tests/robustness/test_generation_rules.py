"""Issue 11, item 5: chat roles outside system/user/assistant/tool are INVALID_ARGUMENT,
and the generation cap is refused under its own failure reason."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskserve.server.errors import Code, GenerationCapExceeded, InvalidInput
from taskserve.server.metrics import ServerMetrics
from taskserve.server.tasks.base import CallOptions, TaskContext
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.text_generation import GenerateParams, TextGenerator
from tests.tasks.test_generation_task import EOS, decoder_model


@pytest.fixture
def context() -> Iterator[TaskContext]:
    ctx = TaskContext(workers=1)
    yield ctx
    ctx.close()


def _chat_model(tmp_path: Path) -> object:
    model = decoder_model(tmp_path, [EOS])
    (model.model_dir / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"})
    )
    return model


@pytest.mark.parametrize("role", ["wizard", "", "User", "system "])
async def test_a_role_outside_the_chat_roles_is_invalid_argument(
    tmp_path: Path, context: TaskContext, role: str
) -> None:
    task = TextGenerator.load(_chat_model(tmp_path), context)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"messages\[1\]\.role .* is not a chat role") as caught:
        messages = [ChatMessage("user", "hi"), ChatMessage(role, "x")]
        [c async for c in task.generate("", messages, GenerateParams(), CallOptions())]
    assert caught.value.code is Code.INVALID_ARGUMENT


async def test_the_four_chat_roles_are_accepted(tmp_path: Path, context: TaskContext) -> None:
    task = TextGenerator.load(_chat_model(tmp_path), context)  # type: ignore[arg-type]
    messages = [ChatMessage(r, "x") for r in ("system", "user", "assistant", "tool")]
    chunks = [c async for c in task.generate("", messages, GenerateParams(), CallOptions())]
    assert chunks


async def test_the_generation_cap_has_its_own_failure_reason(tmp_path: Path, context: TaskContext) -> None:
    task = TextGenerator.load(decoder_model(tmp_path, [EOS], max_new_tokens_limit=16), context)
    with pytest.raises(GenerationCapExceeded, match="over the limit of 16") as caught:
        [c async for c in task.generate("Hi", [], GenerateParams(max_new_tokens=17), CallOptions())]
    assert caught.value.code is Code.INVALID_ARGUMENT
    metrics = ServerMetrics().for_model("decoder", "1")
    metrics.request_raised(caught.value, 1000)
    assert metrics._s.failure == {"generation_cap": 1}
