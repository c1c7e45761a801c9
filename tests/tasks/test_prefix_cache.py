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


def _greedy(build: Callable[[], SlotCacheRunner], cache: bool) -> tuple[list[list[int]], CollectorRegistry]:
    """Tokens of every prompt through the engine: one alone first (its slot becomes a cached
    prefix), one cancelled after its second token, then the rest at once (copies from cached and
    running slots, takeovers, evictions: 4 slots for 6 sequences)."""
    runner = build()
    settings = GenerationConfig(
        max_num_seqs=4, max_num_batched_tokens=32, prefill_chunk_size=16,
        max_model_len=runner.max_model_len, prefix_caching=cache,
    )  # fmt: skip
    metrics = ServerMetrics()
    engine = GenerationScheduler("m", settings, runner, metrics.for_model("m", "1"))

    def request(suffix: list[int], new: int = 8) -> SequenceRequest:
        return SequenceRequest(tuple(SHARED + suffix), new, TokenSampler(Sampling()))

    async def collect(suffix: list[int]) -> list[int]:
        return [t async for t in engine.generate(request(suffix))]

    async def main() -> list[list[int]]:
        await engine.start()
        try:
            first = await collect(SUFFIXES[0])
            stream: Any = engine.generate(request(SUFFIXES[5], 30))
            seen = []
            async for token in stream:
                seen.append(token)
                if len(seen) == 2:
                    break  # leaving the iteration cancels it
            rest = await asyncio.gather(*(collect(s) for s in SUFFIXES[1:]))
            return [first, *rest]
        finally:
            await engine.stop()

    return asyncio.run(asyncio.wait_for(main(), 120)), metrics.registry


def test_greedy_tokens_with_the_cache_equal_those_without(build: Callable[[], SlotCacheRunner]) -> None:
    off, off_metrics = _greedy(build, cache=False)
    on, on_metrics = _greedy(build, cache=True)
    assert on == off and all(len(t) == 8 for t in on)
    labels = {"model": "m", "version": "1"}
    hits = on_metrics.get_sample_value("taskserve_prefix_cache_hits_total", labels)
    reused = on_metrics.get_sample_value("taskserve_prefix_cache_reused_tokens_total", labels)
    queries = on_metrics.get_sample_value("taskserve_prefix_cache_queries_total", labels)
    assert queries == 7 and hits is not None and hits >= 5 and reused is not None and reused >= 16 * hits
    assert off_metrics.get_sample_value("taskserve_prefix_cache_hits_total", labels) is None
