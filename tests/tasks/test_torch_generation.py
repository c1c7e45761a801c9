"""KV-cache decoders as torch entries (``causal-lm``): a Llama-family decoder exports with a
generation block and runs on the generation engine through ``TorchDecoderRunner`` (the KV
cache on the model's device, here the CPU); greedy decoding gives the ONNX entry's tokens,
alone and with concurrent generations whose steps share batches. Other decoders (GPT-2) have
no torch form the engine runs: ``--format torch`` refuses them at export."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests.support.server import ServerProcess, ServerThread, running_server

PROMPTS = ["The cat", "Once upon a time in a land far away", "x", "Hello there, how are"]
# torch entry -> the ONNX entry of the same weights it must agree with.
PAIRS = {"llama-torch": "tiny-llama"}


@pytest.fixture(scope="module")
def torch_repo(tiny_sources: dict[str, Path], task_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskserve.exporters.api import export_hf

    repo = tmp_path_factory.mktemp("torch-generation")
    for torch_name, onnx_name in PAIRS.items():
        # Hard links, not a symlink: the server refuses model files that resolve outside its repository.
        shutil.copytree(task_repository / onnx_name, repo / onnx_name, copy_function=os.link)
        export_hf(tiny_sources[onnx_name], "text-generation", repo, torch_name, format="torch", progress=False)
    return repo


@pytest.fixture(scope="module")
def server(torch_repo: Path) -> Iterator[ServerThread]:
    with running_server(torch_repo) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def _ids(channel: grpc.Channel, model: str, prompt: str) -> list[int]:
    stub = tg_grpc.TextGenerationStub(channel)
    request = tg.GenerateRequest(model=common.ModelRef(name=model), prompt=prompt, max_new_tokens=12, temperature=0)
    return [t for reply in stub.Generate(request, timeout=60) for t in reply.token_ids]


def test_a_llama_torch_entry_runs_on_the_engine_with_its_cache_on_the_device(
    torch_repo: Path, server: ServerThread, channel: grpc.Channel
) -> None:
    config = yaml.safe_load((torch_repo / "llama-torch" / "config.yaml").read_text())
    assert config["platform"] == "torch" and "generation" in config and "dynamic_batching" not in config
    assert config["generation"]["max_model_len"] == 128  # the tiny model's positions
    assert server.app is not None
    loaded = server.app.models.get("llama-torch")
    assert "KV cache on the device" in loaded.platform_description
    metadata = pb_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(pb.ModelMetadataRequest(name="llama-torch"))
    # On the engine the entry presents the LLM convention over v2 (frontends/v2/text_generation.py).
    assert metadata.inputs[0].name == "text_input" and [t.name for t in metadata.outputs] == ["text_output"]
    assert metadata.platform == "pytorch"


def test_a_gpt2_torch_export_is_refused_rather_than_written_unservable(
    tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    from taskserve.exporters.api import export_hf
    from taskserve.exporters.errors import UsageError

    with pytest.raises(UsageError, match="has no torch entry"):
        export_hf(tiny_sources["tiny-gpt2"], "text-generation", tmp_path, "gpt2-torch", format="torch", progress=False)
    assert not (tmp_path / "gpt2-torch").exists()


@pytest.mark.parametrize("torch_name", sorted(PAIRS))
def test_greedy_tokens_equal_the_onnx_entry(channel: grpc.Channel, torch_name: str) -> None:
    for prompt in PROMPTS:
        got = _ids(channel, torch_name, prompt)
        assert got and got == _ids(channel, PAIRS[torch_name], prompt), prompt


@pytest.mark.parametrize("torch_name", sorted(PAIRS))
def test_concurrent_generations_share_steps_and_stay_equal(channel: grpc.Channel, torch_name: str) -> None:
    alone = {p: _ids(channel, torch_name, p) for p in PROMPTS}
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda i: _ids(channel, torch_name, PROMPTS[i % 4]), range(8)))
    for i, ids in enumerate(together):
        assert ids == alone[PROMPTS[i % 4]]


def test_the_torch_runner_matches_transformers_across_chunks_slots_and_reuse(
    torch_repo: Path, tiny_sources: dict[str, Path]
) -> None:
    """The runner alone: a chunked prompt, decode rows of three slots in one call in a
    different order each step, and a released slot reused; every logit row against
    transformers on the whole sequence."""
    import torch
    import transformers

    from taskserve.server.errors import InvalidInput
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    entry = torch_repo / "llama-torch"
    runner = TorchDecoderRunner(entry / "1" / "torch_model.json", load_model_config(entry))
    runner.load()
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_sources["tiny-llama"])).eval()

    def expected(ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return reference(torch.tensor([ids])).logits[0, -1].numpy()  # type: ignore[no-any-return]

    rng = np.random.default_rng(3)
    prompts = {0: rng.integers(0, 400, 5), 5: rng.integers(0, 400, 11), 2: rng.integers(0, 400, 1)}
    seqs = {slot: [int(t) for t in p] for slot, p in prompts.items()}
    last = {0: runner.step([StepRow(0, prompts[0], 0)])[0]}
    runner.step([StepRow(5, prompts[5][:6], 0)])
    last[5] = runner.step([StepRow(5, prompts[5][6:], 6)])[0]  # the prompt's second chunk
    last[2] = runner.step([StepRow(2, prompts[2], 0)])[0]
    worst = max(float(np.abs(last[s] - expected(seqs[s])).max()) for s in seqs)
    for order in ([2, 0, 5], [5, 2, 0], [0, 5, 2]):
        rows = [StepRow(s, np.array([int(np.argmax(last[s]))]), len(seqs[s])) for s in order]
        for row in rows:
            seqs[row.slot].append(int(row.tokens[0]))
        for row, logits in zip(rows, runner.step(rows), strict=True):
            last[row.slot] = logits
            worst = max(worst, float(np.abs(logits - expected(seqs[row.slot])).max()))
    assert worst < 1e-4
    # An id past the embedding table is refused before the device sees it (on CUDA it would be
    # a device-side assert); the slot is untouched and decodes on.
    with pytest.raises(InvalidInput, match="token ids"):
        runner.step([StepRow(0, np.array([runner.vocab_size]), len(seqs[0]))])
    after = runner.step([StepRow(0, np.array([int(np.argmax(last[0]))]), len(seqs[0]))])[0]
    assert np.abs(after - expected([*seqs[0], int(np.argmax(last[0]))])).max() < 1e-4
    runner.release(5)
    reused = runner.step([StepRow(5, prompts[2], 0)])[0]
    assert np.abs(reused - expected([int(prompts[2][0])])).max() < 1e-4
    # layers x (keys, values) x slots x kv heads x positions x head size x fp32
    assert runner.cache_bytes == 2 * 2 * 16 * 2 * 128 * 16 * 4
    runner.close()


def test_torch_entries_on_and_off_the_engine_load_side_by_side_in_a_fresh_process(torch_repo: Path) -> None:
    """Both load transformers on their own loading threads. The first use in a process races
    inside transformers' lazy module unless every torch loader holds the same lock: MiniLM
    beside SmolLM2 failed 3 of 3 starts with "module 'transformers' has no attribute
    'AutoModel'" before the engine's runner took it."""
    import time

    server = ServerProcess(torch_repo)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                states = {m.name: (m.state, m.reason) for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}
                if len(states) == 2 and all(state in ("READY", "UNAVAILABLE") for state, _ in states.values()):
                    break
                time.sleep(0.2)
        assert {name: state for name, (state, _) in states.items()} == dict.fromkeys(
            ["llama-torch", "tiny-llama"], "READY"
        ), states
    finally:
        server.terminate()
        server.wait()



def test_prefill_chunks_of_several_sequences_run_as_one_call_and_equal_one_at_a_time(torch_repo: Path) -> None:
    """One step with decode rows and the prompt chunks of three sequences (lengths 7, 5 and 4,
    one a second chunk): the chunks run as one padded model call, and every row's logits, and
    the decodes after them, equal the same rows run one at a time."""
    import torch

    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    entry = torch_repo / "llama-torch"
    config = load_model_config(entry)
    together = TorchDecoderRunner(entry / "1" / "torch_model.json", config)
    alone = TorchDecoderRunner(entry / "1" / "torch_model.json", config)
    together.load()
    alone.load()
    calls: list[tuple[int, ...]] = []
    compute = together._compute

    def counted(tokens: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(tuple(tokens.shape))
        return compute(tokens, *args)  # type: ignore[arg-type]

    together._compute = counted  # type: ignore[method-assign]
    rng = np.random.default_rng(9)
    first = {slot: rng.integers(0, 400, n) for slot, n in ((0, 3), (1, 6), (2, 7), (3, 5), (4, 4))}
    for slot in (0, 1):  # slot 0 decodes in the mixed step; slot 1's prompt gets its second chunk there
        for runner in (together, alone):
            runner.step([StepRow(slot, first[slot], 0)])
    calls.clear()
    decode = StepRow(0, np.array([7]), 3)
    second = StepRow(1, rng.integers(0, 400, 4), 6)
    mixed = [decode, StepRow(2, first[2], 0), second, StepRow(3, first[3], 0), StepRow(4, first[4], 0)]
    got = together.step(mixed)
    assert calls == [(1, 1), (4, 7)]  # the decode row, then the four prompt chunks padded to 7 tokens
    want = np.stack([alone.step([row])[0] for row in mixed])
    np.testing.assert_allclose(got, want, atol=1e-5)
    # The padding wrote nothing a later step reads: the decodes after it agree too.
    ends = [r.start + len(r.tokens) for r in mixed]
    for step in range(3):
        rows = [StepRow(r.slot, np.array([int(np.argmax(want[i]))]), ends[i] + step) for i, r in enumerate(mixed)]
        want, got = alone.step(rows), together.step(rows)
        np.testing.assert_allclose(got, want, atol=1e-5)
    together.close()
    alone.close()


def test_the_torch_runner_samples_where_the_logits_are(torch_repo: Path) -> None:
    """``sample``: greedy rows take their argmax in the runner (their sampler's host ``pick``
    is never called: no logits row leaves), sampling rows use their own seeded sampler on
    their row alone; rows inside their prompt pick nothing. Same tokens as ``step`` + host picks."""
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.sampling import Sampling, TokenSampler
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    class DeviceOnly(TokenSampler):
        def pick(self, logits: np.ndarray) -> int:
            raise AssertionError("a greedy row's logits reached the host sampler")

    entry = torch_repo / "llama-torch"
    config = load_model_config(entry)
    sampling = TorchDecoderRunner(entry / "1" / "torch_model.json", config)
    reference = TorchDecoderRunner(entry / "1" / "torch_model.json", config)
    sampling.load()
    reference.load()
    rng = np.random.default_rng(2)
    rows = [StepRow(0, rng.integers(0, 400, 6), 0), StepRow(1, rng.integers(0, 400, 3), 0),
            StepRow(2, rng.integers(0, 400, 4), 0)]  # fmt: skip
    hot = Sampling(temperature=1.5, seed=7)
    got = sampling.sample(rows, [DeviceOnly(Sampling()), TokenSampler(hot), None])
    logits = reference.step(rows)
    assert got == [int(np.argmax(logits[0])), TokenSampler(hot).pick(logits[1]), None]
    # A greedy row with a penalty needs its history: its logits row goes to its sampler.
    penalized, prompt = Sampling(repetition_penalty=1.5), rows[0].tokens.tolist()
    decode = [StepRow(0, np.array([got[0]]), 6)]
    got = sampling.sample(decode, [TokenSampler(penalized, prompt)])
    assert got == [TokenSampler(penalized, prompt).pick(reference.step(decode)[0])]
    sampling.close()
    reference.close()


def test_decode_padded_to_graph_buckets_equals_unpadded(torch_repo: Path) -> None:
    """What CUDA graphs replay, computed eagerly on the CPU: decode rows padded up to the next
    power of two (rows in the scratch slot) and attention read up to the next length edge give
    the unpadded logits, across bucket edges (3 rows -> 4, 5 -> 8; length 32 -> 64)."""
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    entry = torch_repo / "llama-torch"
    config = load_model_config(entry)
    plain = TorchDecoderRunner(entry / "1" / "torch_model.json", config)
    padded = TorchDecoderRunner(entry / "1" / "torch_model.json", config, static_shapes=True)
    plain.load()
    padded.load()
    assert padded.cache_bytes == plain.cache_bytes * 17 // 16  # one scratch slot past the 16
    rng = np.random.default_rng(5)
    lengths = {0: 30, 1: 2, 2: 10, 3: 31, 4: 5}
    last: dict[int, np.ndarray] = {}
    for slot, n in lengths.items():
        prompt = rng.integers(0, 400, n)
        want, got = plain.step([StepRow(slot, prompt, 0)])[0], padded.step([StepRow(slot, prompt, 0)])[0]
        np.testing.assert_allclose(got, want, atol=1e-5)
        last[slot] = want
    for slots in ([0], [0, 1, 2], [4, 3, 2, 1, 0], [3, 0], [1, 3, 0]):
        rows = [StepRow(s, np.array([int(np.argmax(last[s]))]), lengths[s]) for s in slots]
        want, got = plain.step(rows), padded.step(rows)
        np.testing.assert_allclose(got, want, atol=1e-5)
        for row, logits in zip(rows, want, strict=True):
            last[row.slot] = logits
            lengths[row.slot] += 1
    assert lengths[0] > 32 and lengths[3] > 32  # decoded across the first length edge
    assert padded.graph_count == 0  # no CUDA here: the padded calls ran eagerly
    plain.close()
    padded.close()
