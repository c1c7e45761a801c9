"""The prefix cache on real runners (tiny random-weight Llama, ONNX and torch): a prefix
copied or kept by ``copy_prefix`` gives the logits of computing the prompt from scratch,
and the engine's greedy tokens with the cache on equal those with it off, prompts arriving
alone, together, and after a cancelled sequence sharing their prefix; the hits show in the
Prometheus metrics. (The core's decisions: tests/unit/scheduling/test_prefix_cache.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from taskserve.server.metrics import ServerMetrics
from taskserve.server.repository.config import GenerationConfig, load_model_config
from taskserve.server.runtimes.generation import SlotCacheRunner, StepRow
from taskserve.server.runtimes.sampling import Sampling, TokenSampler
from taskserve.server.scheduling.generation_scheduler import GenerationScheduler, SequenceRequest

MODEL = "tiny-llama"
rng = np.random.default_rng(21)
SHARED = [int(t) for t in rng.integers(0, 400, 40)]  # two whole blocks and 8 more
SUFFIXES = [[int(t) for t in rng.integers(0, 400, n)] for n in (3, 5, 1, 7, 4, 2)]


@pytest.fixture(scope="module")
def torch_entry(tiny_sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskserve.exporters.api import export_hf

    repo = tmp_path_factory.mktemp("prefix-torch")
    export_hf(tiny_sources[MODEL], "text-generation", repo, "llama-torch", format="torch", progress=False)
    return repo / "llama-torch"


def _onnx(task_repository: Path) -> Callable[[], SlotCacheRunner]:
    from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner

    entry = task_repository / MODEL

    def build() -> SlotCacheRunner:
        config = load_model_config(entry)
        runner = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
        runner.load()
        return runner

    return build


def _torch(entry: Path) -> Callable[[], SlotCacheRunner]:
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    def build() -> SlotCacheRunner:
        runner = TorchDecoderRunner(entry / "1" / "torch_model.json", load_model_config(entry))
        runner.load()
        return runner

    return build


@pytest.fixture(params=["onnx", "torch"])
def build(request: pytest.FixtureRequest, task_repository: Path) -> Callable[[], SlotCacheRunner]:
    if request.param == "onnx":
        return _onnx(task_repository)
    return _torch(request.getfixturevalue("torch_entry"))


def test_a_copied_or_kept_prefix_gives_the_logits_of_the_whole_prompt(build: Callable[[], SlotCacheRunner]) -> None:
    runner = build()
    try:
        tokens = np.asarray
        prompt = SHARED + SUFFIXES[0]
        other = SHARED[:30] + SUFFIXES[1]
        # Reference: each prompt computed from scratch in a slot of its own.
        want = runner.step([StepRow(6, tokens(other), 0)])[0]
        runner.release(6)
        runner.step([StepRow(1, tokens(prompt), 0)])  # the cached sequence, slot 1
        # Copy 30 positions into slot 4 (which held something else before) and compute the rest.
        runner.step([StepRow(4, tokens(SUFFIXES[3] * 4), 0)])
        runner.copy_prefix(1, 4, 30)
        got = runner.step([StepRow(4, tokens(other[30:]), 30)])[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
        # Slot 1 still holds its own prompt: a decode step there equals the whole sequence from scratch.
        whole = runner.step([StepRow(9, tokens([*prompt, 11]), 0)])[0]
        np.testing.assert_allclose(runner.step([StepRow(1, tokens([11]), len(prompt))])[0], whole, atol=1e-4)
        # Taken over: slot 1 keeps its first 30 positions and goes on from there.
        runner.copy_prefix(1, 1, 30)
        got = runner.step([StepRow(1, tokens(other[30:]), 30)])[0]
        np.testing.assert_allclose(got, want, atol=1e-4)
    finally:
        runner.close()


def _greedy(
    build: Callable[[], SlotCacheRunner], cache: bool, prompts: list[list[int]], new: int = 8
) -> tuple[list[list[int]], CollectorRegistry]:
    """Greedy tokens of every prompt through the engine: the first alone (its slot becomes a
    cached prefix), then one more cancelled after its second token, then the rest at once
    (copies from cached and running slots, takeovers, evictions: 4 slots for 6 sequences)."""
    runner = build()
    settings = GenerationConfig(
        max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk_size=16,
        max_model_len=min(runner.max_model_len, 512), prefix_caching=cache,
    )  # fmt: skip
    metrics = ServerMetrics()
    engine = GenerationScheduler("m", settings, runner, metrics.for_model("m", "1"))

    def request(prompt: list[int], new: int) -> SequenceRequest:
        return SequenceRequest(tuple(prompt), new, TokenSampler(Sampling()))

    async def collect(prompt: list[int]) -> list[int]:
        return [t async for t in engine.generate(request(prompt, new))]

    async def main() -> list[list[int]]:
        await engine.start()
        try:
            first = await collect(prompts[0])
            stream: Any = engine.generate(request(prompts[-1][:-1], 30))
            seen = []
            async for token in stream:
                seen.append(token)
                if len(seen) == 2:
                    break  # leaving the iteration cancels it
            rest = await asyncio.gather(*(collect(p) for p in prompts[1:]))
            return [first, *rest]
        finally:
            await engine.stop()

    return asyncio.run(asyncio.wait_for(main(), 300)), metrics.registry


def test_greedy_tokens_with_the_cache_equal_those_without(build: Callable[[], SlotCacheRunner]) -> None:
    prompts = [SHARED + suffix for suffix in SUFFIXES]
    off, off_metrics = _greedy(build, False, prompts)
    on, on_metrics = _greedy(build, True, prompts)
    assert on == off and all(len(t) == 8 for t in on)
    labels = {"model": "m", "version": "1"}
    hits = on_metrics.get_sample_value("taskserve_prefix_cache_hits_total", labels)
    reused = on_metrics.get_sample_value("taskserve_prefix_cache_reused_tokens_total", labels)
    queries = on_metrics.get_sample_value("taskserve_prefix_cache_queries_total", labels)
    assert queries == 7 and hits is not None and hits >= 5 and reused is not None and reused >= 16 * hits
    assert off_metrics.get_sample_value("taskserve_prefix_cache_hits_total", labels) is None


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_smollm2_greedy_tokens_with_a_shared_system_prompt_equal_those_without_the_cache(
    smollm2_repository: Path,
) -> None:
    from tokenizers import Tokenizer

    from taskserve.exporters.demo import ENTRY_NAMES
    from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner

    entry = smollm2_repository / ENTRY_NAMES["smollm2"]
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    system = (
        "<|im_start|>system\nYou are a careful assistant for a library. Answer in one short sentence, "
        "name the shelf where the book stands, and never invent titles that the catalogue does not list."
        "<|im_end|>\n"
    )
    questions = ["Where is Moby Dick?", "Do you have atlases?", "Poetry?", "Where are the cookbooks kept?",
                 "Is there a shelf for chess books?", "Hi"]  # fmt: skip
    prompts = [tokenizer.encode(f"{system}<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids
               for q in questions]  # fmt: skip
    assert min(len(p) for p in prompts) > 40

    def build() -> SlotCacheRunner:
        config = load_model_config(entry)
        runner = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
        runner.load()
        return runner

    off, _ = _greedy(build, False, prompts, new=12)
    on, metrics = _greedy(build, True, prompts, new=12)
    assert on == off
    hits = metrics.get_sample_value("taskserve_prefix_cache_hits_total", {"model": "m", "version": "1"})
    assert hits is not None and hits >= 5
