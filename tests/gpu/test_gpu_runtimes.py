"""Every GPU runtime present, on a real NVIDIA GPU (skipped without one; run by
benchmarks/gpu/device_check.sh on the lent H200):

- the PyTorch runtime in fp16 on CUDA within fp16 tolerance of the CPU fp32 reference
  (all-MiniLM-L6-v2 and EfficientNet-Lite0 torch entries), with and without CUDA graphs;
- concurrent requests batched on the GPU through the server; memory released on unload;
- onnxruntime's CUDA provider with I/O binding (when onnxruntime-gpu is installed);
- the native TensorRT runtime on an engine built here (when TensorRT is installed);
- the generation engine's torch runner (KV cache on the device) in fp16 within tolerance of
  the CPU fp32 runner, decode steps of concurrent streams batched on the GPU, memory released.

Models: ``TASKSERVE_GPU_MODELS`` (a repository holding the torch entries, as device_check.sh
unpacks them) or, failing that, the demo builder (needs the PyPI model packages).
"""

from __future__ import annotations

import gc
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.gpu

MINILM = "all-MiniLM-L6-v2-torch"
EFFNET = "efficientnet-lite0-torch"


def _torch_cuda() -> Any:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


@pytest.fixture(scope="session")
def gpu_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("TASKSERVE_GPU_MODELS")
    if given:
        repo = Path(given)
        if not (repo / MINILM).is_dir():
            pytest.skip(f"TASKSERVE_GPU_MODELS={given} holds no {MINILM}")
        return repo
    try:
        from taskserve.exporters.demo import build_demo

        repo = tmp_path_factory.mktemp("gpu-models")
        build_demo(repo, ["minilm-torch", "efficientnet-lite0-torch"])
    except ImportError as err:
        pytest.skip(f"cannot build the torch entries here ({err}); set TASKSERVE_GPU_MODELS")
    return repo


def _v2(address: str) -> Any:
    """The v2 service through the generated stubs (tritonclient need not be on the GPU machine)."""
    import grpc

    from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
    from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc

    return pb, pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def _index(address: str) -> dict[str, Any]:
    pb, stub = _v2(address)
    return {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


def _variant(source: Path, dest: Path, **changes: Any) -> Path:
    """A copy of an entry (files linked) with config.yaml changes."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "config.yaml":
            # Hard links: the server refuses model files that resolve outside its repository.
            if item.is_dir():
                shutil.copytree(item, dest / item.name, copy_function=os.link)
            else:
                os.link(item, dest / item.name)
    config = yaml.safe_load((source / "config.yaml").read_text())
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    config.pop("name", None)
    (dest / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def _runtime(entry: Path, gpu: int | None, **runtime: Any) -> Any:
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.torch_runtime import TorchRuntime

    config = load_model_config(entry)
    config = config.model_copy(
        update={"runtime": config.runtime.model_copy(update={"torch": config.runtime.torch.model_copy(update=runtime)})}
    )
    rt = TorchRuntime(entry / "1" / config.default_model_filename, config, gpu)
    rt.load()
    return rt


def _token_batch(rows: int, length: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 8000, size=(rows, length), dtype=np.int64)
    mask = np.ones((rows, length), dtype=np.int64)
    for r in range(rows):
        mask[r, length - r :] = 0  # row r has r padding positions
    ids[:, 0] = 101
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def test_torch_fp16_minilm_within_tolerance_of_cpu_fp32(gpu_models: Path) -> None:
    _torch_cuda()
    gpu = _runtime(gpu_models / MINILM, 0)
    cpu = _runtime(gpu_models / MINILM, None, device="cpu", dtype="fp32")
    assert gpu.device == "cuda:0" and "float16" in gpu.description
    batch = _token_batch(6, 24)
    got, want = gpu.infer(batch), cpu.infer(batch)
    for name in ("sentence_embedding", "token_embeddings"):
        assert got[name].dtype == np.float32 and got[name].shape == want[name].shape
    emb_gpu, emb_cpu = got["sentence_embedding"], want["sentence_embedding"]
    assert float(np.max(np.abs(emb_gpu - emb_cpu))) < 5e-3
    cosine = np.sum(emb_gpu * emb_cpu, axis=1) / (np.linalg.norm(emb_gpu, axis=1) * np.linalg.norm(emb_cpu, axis=1))
    assert float(cosine.min()) > 0.9995
    gpu.close()
    cpu.close()


def test_torch_fp16_efficientnet_within_tolerance_of_cpu_fp32(gpu_models: Path) -> None:
    _torch_cuda()
    gpu = _runtime(gpu_models / EFFNET, 0)
    cpu = _runtime(gpu_models / EFFNET, None, device="cpu", dtype="fp32")
    pixels = np.random.default_rng(1).uniform(-1, 1, size=(4, 3, 224, 224)).astype(np.float32)
    got, want = gpu.infer(pixels_dict := {"pixel_values": pixels})["logits"], cpu.infer(pixels_dict)["logits"]
    scale = float(np.max(np.abs(want)))
    assert float(np.max(np.abs(got - want))) < 0.02 * scale
    assert (got.argmax(1) == want.argmax(1)).all()
    gpu.close()
    cpu.close()


def test_cuda_graphs_replay_equals_eager(gpu_models: Path) -> None:
    _torch_cuda()
    eager = _runtime(gpu_models / EFFNET, 0)
    graphs = _runtime(gpu_models / EFFNET, 0, cuda_graphs=True)
    rng = np.random.default_rng(3)
    for rows in (3, 2, 5, 3, 4):
        pixels = rng.uniform(-1, 1, size=(rows, 3, 224, 224)).astype(np.float32)
        got, want = graphs.infer({"pixel_values": pixels}), eager.infer({"pixel_values": pixels})
        assert got["logits"].shape == (rows, 1000)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-2)
    assert graphs.graph_failure == ""
    assert graphs.graphs == 3  # rows padded to 4 (three batches), 2 and 8
    graphs.close()
    eager.close()


def test_cuda_graphs_on_a_text_model_replay_or_fall_back(gpu_models: Path) -> None:
    """Padded to length buckets and cut back; a model whose forward syncs with the host
    cannot be captured, and then runs eagerly, still correct."""
    _torch_cuda()
    eager = _runtime(gpu_models / MINILM, 0)
    graphs = _runtime(gpu_models / MINILM, 0, cuda_graphs=True)
    for rows, length in ((3, 10), (3, 12), (5, 30), (3, 11)):
        batch = _token_batch(rows, length)
        got, want = graphs.infer(batch), eager.infer(batch)
        assert got["token_embeddings"].shape == want["token_embeddings"].shape == (rows, length, 384)
        np.testing.assert_allclose(got["sentence_embedding"], want["sentence_embedding"], atol=2e-3)
    print(f"MiniLM CUDA graphs: {graphs.graphs} captured; failure: {graphs.graph_failure or 'none'}")
    assert graphs.graphs == 2 or graphs.graph_failure
    graphs.close()
    eager.close()


@pytest.fixture(scope="module")
def gpu_repo(gpu_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("gpu-repo")
    _variant(gpu_models / MINILM, repo / "minilm-gpu", gpus=[0], dynamic_batching={"max_queue_delay_us": 5000})
    return repo


def test_concurrent_requests_batch_on_the_gpu(gpu_repo: Path) -> None:
    _torch_cuda()
    import grpc

    from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
    from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2 as se
    from taskserve.protocol.generated.taskserve.v1 import sentence_embedding_pb2_grpc as se_grpc
    from tests.support.server import running_server

    texts = [f"sentence number {i} about the weather and the markets" for i in range(64)]
    with running_server(gpu_repo) as server, grpc.insecure_channel(server.address) as channel:
        stub = se_grpc.SentenceEmbeddingStub(channel)
        ref = common.ModelRef(name="minilm-gpu")
        alone = np.array(stub.Embed(se.EmbedRequest(model=ref, texts=[texts[0]])).embeddings[0].values)
        with ThreadPoolExecutor(32) as pool:
            replies = list(pool.map(lambda t: stub.Embed(se.EmbedRequest(model=ref, texts=[t])), texts))
        first = np.array(replies[0].embeddings[0].values)
        np.testing.assert_allclose(first, alone, atol=5e-3)
        pb, stub = _v2(server.address)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="minilm-gpu")).model_stats[0]
        # 65 requests, far fewer batches: they shared batches on the GPU.
        assert stats.inference_count == 65
        assert stats.execution_count < 40, (stats.execution_count, stats.inference_count)
        assert "cuda" in server.app.models.get("minilm-gpu").platform_description  # type: ignore[union-attr]


def test_memory_released_on_unload(gpu_repo: Path) -> None:
    torch = _torch_cuda()
    from tests.support.server import running_server

    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(0)
    with running_server(gpu_repo) as server:
        loaded = torch.cuda.memory_allocated(0)
        assert loaded - baseline > 20 * 2**20  # the fp16 weights (~45 MB) are on the device
        pb, stub = _v2(server.address)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="minilm-gpu"))
        deadline = time.monotonic() + 30
        while _index(server.address)["minilm-gpu"].state == "READY" and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(20):
            gc.collect()
            torch.cuda.synchronize()
            if torch.cuda.memory_allocated(0) - baseline < 2 * 2**20:
                break
            time.sleep(0.2)
        assert torch.cuda.memory_allocated(0) - baseline < 2 * 2**20, (baseline, loaded, torch.cuda.memory_allocated(0))


def _ort_cuda() -> Any:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (this onnxruntime has no CUDA provider)")
    return ort


@pytest.fixture(scope="module")
def add_sub(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from onnx import TensorProto

    from tests.support.tiny_models import add_sub_graph, write_entry

    return write_entry(tmp_path_factory.mktemp("ort-gpu"), "simple", add_sub_graph(TensorProto.FLOAT), {})


def test_onnxruntime_cuda_io_binding_matches_cpu(add_sub: Path) -> None:
    _ort_cuda()
    from taskserve.server.repository.config import ModelConfig
    from taskserve.server.runtimes.onnx import OnnxRuntime

    def config(**runtime: Any) -> ModelConfig:
        return ModelConfig.model_validate({"name": "simple", "max_batch_size": 8, "runtime": runtime})

    gpu = OnnxRuntime(add_sub / "1" / "model.onnx", config(execution_providers=["cuda"]), gpu=0)
    gpu.load()
    cpu = OnnxRuntime(add_sub / "1" / "model.onnx", config(execution_providers=["cpu"]))
    cpu.load()
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu._binder is not None
    rng = np.random.default_rng(2)
    for rows in (1, 4, 4, 8):
        a, b = rng.random((rows, 4), dtype=np.float32), rng.random((rows, 4), dtype=np.float32)
        got, want = gpu.infer({"INPUT0": a, "INPUT1": b}), cpu.infer({"INPUT0": a, "INPUT1": b})
        np.testing.assert_allclose(got["OUTPUT0"], want["OUTPUT0"], rtol=1e-6)
        np.testing.assert_allclose(got["OUTPUT1"], want["OUTPUT1"], rtol=1e-6)
    gpu.close()


def test_native_tensorrt_engine_matches_onnxruntime(add_sub: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt")
    _torch_cuda()
    from taskserve.exporters import tensorrt as trt_build
    from taskserve.exporters.spec import TensorSpec
    from taskserve.server.repository.config import ModelConfig
    from taskserve.server.runtimes.tensorrt import TensorRTRuntime

    specs = [TensorSpec("INPUT0", "FP32", (4,)), TensorSpec("INPUT1", "FP32", (4,))]
    profile = trt_build.derive_profile(specs, 8, 16, 8)
    engine = trt_build.build_engine(add_sub / "1" / "model.onnx", profile, False, 256, tmp_path / "cache")
    plan = tmp_path / "1" / "model.plan"
    plan.parent.mkdir()
    shutil.copy(engine, plan)
    config = ModelConfig.model_validate({"name": "plan", "platform": "tensorrt", "max_batch_size": 8})
    runtime = TensorRTRuntime(plan, config, gpu=0)
    runtime.load()
    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    out = runtime.infer({"INPUT0": a, "INPUT1": a})
    np.testing.assert_allclose(out["OUTPUT0"], 2 * a)
    np.testing.assert_allclose(out["OUTPUT1"], 0 * a)
    runtime.close()


def test_a_gpu_model_beside_a_cpu_model(gpu_models: Path, tmp_path: Path) -> None:
    """Placement on the GPU that exists serves; on one that does not, UNAVAILABLE with the reason."""
    torch = _torch_cuda()
    from tests.support.server import running_server

    repo = tmp_path / "repo"
    _variant(gpu_models / EFFNET, repo / "effnet-gpu0", gpus=[0])
    _variant(gpu_models / EFFNET, repo / "effnet-missing", gpus=[torch.cuda.device_count()])
    _variant(gpu_models / EFFNET, repo / "effnet-cpu", runtime={"torch": {"device": "cpu"}})
    with running_server(repo) as server:
        index = _index(server.address)
        assert index["effnet-gpu0"].state == "READY" and index["effnet-cpu"].state == "READY"
        assert index["effnet-missing"].state == "UNAVAILABLE" and "GPU(s)" in index["effnet-missing"].reason


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (random weights, GQA, heads of 16) as a torch entry on the generation engine."""
    _torch_cuda()
    from tests.support import tiny_hf_models as tiny_models

    root = tmp_path_factory.mktemp("tiny-decoder")
    source = tiny_models.tiny_causal_lm(root / "source", "llama", hidden_size=64)
    entry = root / "repo" / "tiny-llama-torch"
    (entry / "1").mkdir(parents=True)
    for item in source.iterdir():
        weights = item.suffix == ".safetensors" or item.name == "config.json"
        os.link(item, (entry / "1" if weights else entry) / item.name)
    (entry / "1" / "torch_model.json").write_text('{"format": 1, "architecture": "causal-lm"}\n')
    config = {
        "name": "tiny-llama-torch", "task": "text-generation", "platform": "torch",
        "default_model_filename": "torch_model.json",
        "generation": {"max_num_seqs": 16, "max_num_batched_tokens": 256, "max_model_len": 128},
        "task_options": {"tokenizer": "tokenizer.json", "max_length": 128, "eos_token_ids": []},
    }  # fmt: skip
    (entry / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return entry


def _decoder(entry: Path, **torch_options: Any) -> Any:
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    config = load_model_config(entry)
    runtime = config.runtime.model_copy(update={"torch": config.runtime.torch.model_copy(update=torch_options)})
    runner = TorchDecoderRunner(entry / "1" / "torch_model.json", config.model_copy(update={"runtime": runtime}))
    runner.load()
    return runner


def test_torch_decoder_fp16_on_cuda_within_tolerance_of_cpu_fp32_and_frees_its_cache(tiny_decoder: Path) -> None:
    torch = _torch_cuda()
    from taskserve.server.runtimes.generation import StepRow

    gc.collect()
    baseline = torch.cuda.memory_allocated(0)
    gpu = _decoder(tiny_decoder, device="cuda")
    cpu = _decoder(tiny_decoder, device="cpu", dtype="fp32")
    assert "cuda" in gpu.description and "float16" in gpu.description
    loaded = torch.cuda.memory_allocated(0) - baseline
    assert loaded >= gpu.cache_bytes  # the cache is device memory
    rng = np.random.default_rng(0)
    prompts = {0: rng.integers(0, 400, 7), 3: rng.integers(0, 400, 19), 9: rng.integers(0, 400, 2)}
    lengths = {slot: len(p) for slot, p in prompts.items()}
    worst = 0.0
    rows = [StepRow(slot, p, 0) for slot, p in prompts.items()]
    for _ in range(6):  # the prompts, then five decode steps of all three slots in one call
        want, got = cpu.step(rows), gpu.step(rows)
        scale = max(1.0, float(np.abs(want).max()))
        worst = max(worst, float(np.abs(got - want).max()) / scale)
        picks = [int(np.argmax(w)) for w in want]
        rows = [StepRow(r.slot, np.array([t]), lengths[r.slot]) for r, t in zip(rows, picks, strict=True)]
        for r in rows:
            lengths[r.slot] += 1
    assert worst < 3e-2, worst  # of the largest logit; fp16 keeps 11 bits
    cpu.close()
    gpu.close()
    gc.collect()
    torch.cuda.synchronize()
    # The tiny model and its cache take well under a MiB: freed means (almost) nothing left of them.
    left = torch.cuda.memory_allocated(0) - baseline
    assert left <= loaded // 20, (loaded, left)


def test_torch_decoder_cuda_graphs_replay_equals_eager(tiny_decoder: Path) -> None:
    """Decode from captured graphs (rows padded to 1/4, lengths to 32/64) against eager decode
    on the same device, crossing a length edge; the graphs were captured, not skipped."""
    _torch_cuda()
    from taskserve.server.runtimes.generation import StepRow

    eager = _decoder(tiny_decoder, device="cuda")
    graphs = _decoder(tiny_decoder, device="cuda", cuda_graphs=True)
    rng = np.random.default_rng(1)
    lengths = {0: 29, 4: 3, 7: 12}
    last = {}
    for slot, n in lengths.items():
        prompt = rng.integers(0, 400, n)
        last[slot] = eager.step([StepRow(slot, prompt, 0)])[0]
        graphs.step([StepRow(slot, prompt, 0)])
    worst = 0.0
    for slots in ([0], [0, 4, 7], [7, 0, 4], [0], [4, 0, 7], [0, 7], [0, 4, 7]):
        rows = [StepRow(s, np.array([int(np.argmax(last[s]))]), lengths[s]) for s in slots]
        want, got = eager.step(rows), graphs.step(rows)
        worst = max(worst, float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())))
        for row, logits in zip(rows, want, strict=True):
            last[row.slot] = logits
            lengths[row.slot] += 1
    assert graphs.graph_failure == ""
    assert graphs.graph_count >= 3  # (1, 32), (4, 32), (1, 64) at least
    assert worst < 1e-2, worst
    eager.close()
    graphs.close()


def test_torch_decoder_streams_share_decode_steps_on_the_gpu(tiny_decoder: Path) -> None:
    _torch_cuda()
    from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
    from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
    from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
    from tests.support.server import running_server

    with running_server(tiny_decoder.parent) as server:
        import grpc

        assert server.app is not None
        loaded = server.app.models.get("tiny-llama-torch")
        assert "cuda" in loaded.platform_description and "KV cache on the device" in loaded.platform_description
        registry = server.app.metrics.registry
        labels = {"model": "tiny-llama-torch", "version": "1"}
        steps_before = registry.get_sample_value("taskserve_execution_count_total", labels) or 0.0
        with grpc.insecure_channel(server.address) as channel:
            stub = tg_grpc.TextGenerationStub(channel)

            def tokens(i: int) -> int:
                request = tg.GenerateRequest(
                    model=common.ModelRef(name="tiny-llama-torch"), prompt=f"stream {i} says", max_new_tokens=24,
                    temperature=0,
                )  # fmt: skip
                return sum(len(reply.token_ids) for reply in stub.Generate(request, timeout=60))

            with ThreadPoolExecutor(8) as pool:
                counts = list(pool.map(tokens, range(8)))
        steps = (registry.get_sample_value("taskserve_execution_count_total", labels) or 0.0) - steps_before
    assert counts == [24] * 8
    # 192 tokens in far fewer engine iterations: the streams' decode rows shared steps.
    assert steps < sum(counts) / 2, (steps, counts)

