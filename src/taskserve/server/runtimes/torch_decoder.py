"""The PyTorch ``DecoderRunner`` (``runtimes/generation.py``): a Llama-family causal LM
(``platform: torch``, ``causal-lm`` entries with a ``generation:`` block) whose KV cache
stays on the model's device between steps.

Per layer one key and one value tensor of shape (max_slots, kv heads, max_model_len,
head size) on the device (fp16 on CUDA, fp32 on the CPU). A step sends only the new
token ids to the device and samples there (``sample``): greedy rows bring back only their
token id, rows that sample (temperature, penalties) their last position's logits row: the keys and
values of the new tokens are written into their slots in place, and attention reads
each row's own slot up to the longest row's length, masked to the row's positions.
No cache ever crosses to the host.

The layers are transformers' own modules (embeddings, projections, norms, MLP); only
attention is written here, because transformers' caches are one tensor per batch, not
per slot. Rotary tables come from the model's rotary module, as the ONNX engine graph's
(``exporters/engine_graph.py``), so rope scaling variants match.

Decode rows (one token each) run as one batched call whatever their slots. The prefill
chunks of one step (several sequences' prompts) run as one call too, padded on the right
to the longest: a padding token writes its key/value past its row's end, in its own slot,
where no real query looks and the row's next real token overwrites it; each row's logits
come from its last real token. Chunks of very different lengths go in separate calls
(padding a 2-token chunk up to 512 would compute 510 wasted tokens).

``runtime.torch.cuda_graphs``: on CUDA, decode calls replay captured CUDA graphs, one per
(rows, length) bucket: the rows are padded up to the next power of two with rows in a
scratch slot past the real ones, and attention reads up to the next length edge (masked
to each row's positions, so the extra keys change nothing). A capture that fails turns
graphs off for the runner (``graph_failure`` says why); decode then runs eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import TensorInfo
from taskserve.server.runtimes.generation import SlotCacheRunner, StepRow, check_decoder_rows
from taskserve.server.runtimes.graph_shapes import graph_batch_sizes
from taskserve.server.runtimes.sampling import TokenSampler
from taskserve.server.runtimes.torch_runtime import (
    BUILD_LOCK,
    choose_device,
    read_spec,
    set_cpu_threads,
    spec_model_dir,
)

log = logging.getLogger(__name__)

# What this runner computes attention for: the same family the ONNX engine graph takes.
MODEL_TYPES = ("llama", "mistral", "qwen2")
# The shortest attention length a decode graph is captured for; longer ones double up to max_model_len.
MIN_GRAPH_LENGTH = 32


@dataclass
class _DecodeGraph:
    graph: Any  # torch.cuda.CUDAGraph
    tokens: torch.Tensor  # (rows, 1)
    slots: torch.Tensor  # (rows,)
    positions: torch.Tensor  # (rows, 1)
    logits: torch.Tensor  # (rows, vocab) float32


class TorchDecoderRunner(SlotCacheRunner):
    """``static_shapes``: pad decode calls to the graph buckets (default: when CUDA graphs are
    on); without CUDA the padded calls run eagerly, which is how CPU tests check the padding."""

    def __init__(
        self, model_path: Path, config: ModelConfig, gpu: int | None = None, static_shapes: bool | None = None
    ) -> None:
        if config.generation is None:
            raise RuntimeFailure(f"model {config.name!r} has no generation block; it is not an engine model")
        self.config = config
        self.model_path = model_path
        self.gpu = gpu
        self.device = "cpu"
        self.dtype = torch.float32
        self._settings = config.generation
        self._model: Any = None
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._heads = 0
        self._kv_heads = 0
        self._head_dim = 0
        self._static_shapes = static_shapes
        self._graphs: dict[tuple[int, int], _DecodeGraph] = {}
        self._pool: Any = None
        self._capture = False
        self._batch_buckets: tuple[int, ...] = ()
        self._length_buckets: tuple[int, ...] = ()
        # Why CUDA graphs were turned off for this runner (a capture failed), if they were.
        self.graph_failure = ""

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        name = self.config.name
        spec = read_spec(self.model_path.parent, self.model_path.name)
        if spec["architecture"] != "causal-lm":
            raise RuntimeFailure(
                f"model {name!r}: a generation block needs a 'causal-lm' torch entry, not {spec['architecture']!r}"
            )
        self.device, self.dtype = choose_device(self.config, self.gpu, torch.cuda.is_available())
        hf_dir = spec_model_dir(self.model_path.parent, spec)
        try:
            # The import too: transformers' lazy module is not safe to initialize from two loading threads.
            with BUILD_LOCK:
                import transformers

                model: Any = transformers.AutoModelForCausalLM.from_pretrained(
                    str(hf_dir), local_files_only=True
                )
        except Exception as err:  # transformers/safetensors raise many types
            raise RuntimeFailure(f"model {name!r}: cannot build the torch model: {type(err).__name__}: {err}") from err
        hf = model.config
        if hf.model_type not in MODEL_TYPES or getattr(hf, "hidden_act", "silu") != "silu":
            raise RuntimeFailure(
                f"model {name!r}: the generation engine runs {', '.join(MODEL_TYPES)} models in torch, not "
                f"{hf.model_type!r}; remove the generation block to serve it through the dynamic batcher"
            )
        wanted = self._settings.max_model_len
        window = getattr(hf, "sliding_window", None) if getattr(hf, "use_sliding_window", True) else None
        if window and window < wanted:
            raise RuntimeFailure(
                f"model {name!r} attends within a sliding window of {window} positions; set "
                f"generation.max_model_len to at most {window}"
            )
        trained = int(getattr(hf, "max_position_embeddings", 0) or 0)
        if trained and wanted > trained:
            raise RuntimeFailure(
                f"model {name!r}: generation.max_model_len {wanted} exceeds the model's {trained} positions; lower it"
            )
        if self.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(self.device))
        else:
            set_cpu_threads(self.config)
        self._model = model.to(device=self.device, dtype=self.dtype).eval()
        self._heads = int(hf.num_attention_heads)
        self._kv_heads = int(getattr(hf, "num_key_value_heads", None) or self._heads)
        self._head_dim = int(getattr(hf, "head_dim", None) or int(hf.hidden_size) // self._heads)
        self._vocab = int(hf.vocab_size)
        self._positions = wanted
        self._slots = self._settings.max_num_seqs
        self._rotary_tables(model.model.rotary_emb)
        self._capture = self.device.startswith("cuda") and self.config.runtime.torch.cuda_graphs
        if self._static_shapes is None:
            self._static_shapes = self._capture
        self._batch_buckets = graph_batch_sizes(self._slots)
        # The same doubling for lengths, from MIN_GRAPH_LENGTH (or the whole slot, when shorter).
        shortest = min(MIN_GRAPH_LENGTH, self._positions)
        self._length_buckets = tuple(e for e in graph_batch_sizes(self._positions) if e >= shortest)
        # Padding rows of static-shape calls write into one scratch slot past the real ones.
        shape = (self._slots + int(self._static_shapes), self._kv_heads, self._positions, self._head_dim)
        layers = len(model.model.layers)
        self._keys = [self._zeros(shape) for _ in range(layers)]
        self._values = [self._zeros(shape) for _ in range(layers)]
        self._lengths = np.zeros(self._slots, np.int64)
        log.info(
            "model %r on %s (%s): %d cache slots of %d positions, %d layers (%.0f MiB on the device)",
            name, self.device, str(self.dtype).removeprefix("torch."), self._slots, self._positions, layers,
            self.cache_bytes / 2**20,
        )  # fmt: skip

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        # Zeros, never uninitialized memory: attention reads up to the longest row, and a NaN
        # pattern there would poison the masked softmax. On the CPU, numpy's zeroed pages are
        # mapped on first write, so memory grows with the positions used.
        if self.device == "cpu" and self.dtype == torch.float32:
            return torch.from_numpy(np.zeros(shape, np.float32))
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _rotary_tables(self, rotary: Any) -> None:
        positions = torch.arange(self._positions, dtype=torch.float32)
        freqs = torch.outer(positions, rotary.inv_freq.detach().to("cpu", torch.float32))
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        table = torch.cat((freqs, freqs), dim=-1)
        self._cos = (table.cos() * scaling).to(self.device, self.dtype)
        self._sin = (table.sin() * scaling).to(self.device, self.dtype)

    def close(self) -> None:
        on_gpu = self._model is not None and self.device.startswith("cuda")
        self._graphs.clear()
        self._pool = None
        self._model = None
        self._keys, self._values = [], []
        self._cos = self._sin = None
        if on_gpu:
            torch.cuda.empty_cache()

    # -- what the server declares --------------------------------------------------------

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo("input_ids", "INT64", (-1, -1))]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo("logits", "FP32", (-1, self._vocab))]

    @property
    def description(self) -> str:
        graphs = ", CUDA graphs for decode" if self._capture and not self.graph_failure else ""
        return (
            f"torch on {self.device} ({str(self.dtype).removeprefix('torch.')}), KV cache on the device "
            f"({self._slots} slots x {self._positions} positions){graphs}"
        )

    @property
    def graph_count(self) -> int:
        """Decode graphs captured so far."""
        return len(self._graphs)

    # -- DecoderRunner -----------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self._keys, *self._values))

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        with self._on_device():
            logits: np.ndarray = self._run(rows).cpu().numpy()
        return logits

    def sample(self, rows: Sequence[StepRow], samplers: Sequence[TokenSampler | None]) -> list[int | None]:
        """Greedy rows take their argmax on the device: only their token ids cross to the host.
        Rows that sample (temperature, penalties) bring their own logits row over."""
        picked: list[int | None] = [None] * len(rows)
        with self._on_device():
            logits = self._run(rows)
            greedy = [i for i, s in enumerate(samplers) if s is not None and s.greedy_only]
            if greedy:
                index = torch.as_tensor(greedy, device=logits.device)
                for i, token in zip(greedy, logits.index_select(0, index).argmax(dim=-1).tolist(), strict=True):
                    picked[i] = int(token)
            others = [i for i, s in enumerate(samplers) if s is not None and not s.greedy_only]
            host = logits[others].cpu().numpy() if others else None
        for j, i in enumerate(others):
            sampler = samplers[i]
            assert sampler is not None and host is not None
            picked[i] = sampler.pick(host[j])
        return picked

    def _copy_positions(self, src: int, dst: int, positions: int) -> None:
        """A device-side slice copy per layer: the cache never crosses to the host."""
        with self._on_device():
            for buffer in (*self._keys, *self._values):
                buffer[dst, :, :positions].copy_(buffer[src, :, :positions])

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """Inference mode with the model's GPU current (the engine's thread is not the loading
        one; streams, graph capture and the graph pool follow the current device); a failure
        (CUDA out of memory, a kernel) becomes RuntimeFailure: the engine fails these rows."""
        if self._model is None:
            raise RuntimeFailure(f"model {self.config.name!r} is not loaded")
        device = torch.cuda.device(self.device) if self.device.startswith("cuda") else contextlib.nullcontext()
        try:
            with torch.inference_mode(), device:
                yield
        except (RuntimeFailure, InvalidInput):
            raise
        except Exception as err:
            raise RuntimeFailure(f"torch failed on model {self.config.name!r}: {type(err).__name__}: {err}") from err

    def _run(self, rows: Sequence[StepRow]) -> torch.Tensor:
        """The step's float32 logits (rows, vocab), left on the device."""
        check_decoder_rows(self.config.name, rows, self._positions, self._lengths, self._vocab)
        out = torch.empty((len(rows), self._vocab), dtype=torch.float32, device=self.device)
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        if decode and self._static_shapes:
            out[decode] = self._decode_static([rows[i] for i in decode])
        elif decode:
            out[decode] = self._forward([rows[i] for i in decode])
        for group in self._prefill_groups([i for i, r in enumerate(rows) if len(r.tokens) > 1], rows):
            out[group] = self._forward([rows[i] for i in group])
        for row in rows:
            self._lengths[row.slot] = row.start + len(row.tokens)
        return out

    # -- execution -------------------------------------------------------------------------

    def _prefill_groups(self, indices: list[int], rows: Sequence[StepRow]) -> list[list[int]]:
        """Prefill rows (by index) in calls: longest first, a row joins the current call while
        it is at least half the call's longest and its padding stays inside its slot."""
        groups: list[list[int]] = []
        longest = 0
        for i in sorted(indices, key=lambda i: -len(rows[i].tokens)):
            n = len(rows[i].tokens)
            fits = rows[i].start + longest <= self._positions
            if groups and 2 * n >= longest and fits:
                groups[-1].append(i)
            else:
                groups.append([i])
                longest = n
        return groups

    def _forward(self, rows: list[StepRow]) -> torch.Tensor:
        """One model call over rows of any number of new tokens (padded on the right to the
        longest, inside each row's slot); each row's last real token's logits, float32 on the device."""
        device = self.device
        counts = np.asarray([len(r.tokens) for r in rows], np.int64)
        new = int(counts.max())
        padded = np.zeros((len(rows), new), np.int64)
        for i, row in enumerate(rows):
            padded[i, : len(row.tokens)] = row.tokens
        tokens = torch.from_numpy(padded).to(device)
        starts = np.asarray([r.start for r in rows], np.int64)
        positions = torch.from_numpy(starts[:, None] + np.arange(new, dtype=np.int64)).to(device)  # (rows, new)
        slots = torch.as_tensor([r.slot for r in rows], dtype=torch.int64, device=device)
        one_slot = rows[0].slot if len(rows) == 1 else None
        last = None if bool((counts == new).all()) else torch.from_numpy(counts - 1).to(device)
        total = int(starts.max()) + new
        return self._compute(tokens, slots, positions, total, one_slot, last)

    def _decode_static(self, rows: list[StepRow]) -> torch.Tensor:
        """Decode rows padded to a (rows, length) bucket: replayed from a CUDA graph when
        graphs are on, else computed eagerly on the same padded shapes."""
        count = len(rows)
        batch = next(b for b in self._batch_buckets if b >= count)
        length = next(edge for edge in self._length_buckets if edge >= max(r.start for r in rows) + 1)
        tokens = np.zeros((batch, 1), np.int64)
        slots = np.full(batch, self._slots, np.int64)  # padding rows: position 0 of the scratch slot
        positions = np.zeros((batch, 1), np.int64)
        for i, row in enumerate(rows):
            tokens[i, 0], slots[i], positions[i, 0] = int(row.tokens[0]), row.slot, row.start
        host = (torch.from_numpy(tokens), torch.from_numpy(slots), torch.from_numpy(positions))
        graph = self._graph(batch, length, host) if self._capture and not self.graph_failure else None
        if graph is None:
            on_device = [t.to(self.device) for t in host]
            logits = self._compute(on_device[0], on_device[1], on_device[2], length, None)
        else:
            for static, value in zip((graph.tokens, graph.slots, graph.positions), host, strict=True):
                static.copy_(value)
            graph.graph.replay()
            logits = graph.logits
        return logits[:count]  # the graph's static buffer: the caller copies it out before the next replay

    def _graph(self, batch: int, length: int, host: tuple[torch.Tensor, ...]) -> _DecodeGraph | None:
        """The graph of one bucket, captured on first use (its warm-up runs compute this very
        call's rows, which the replay then recomputes identically). None: capture failed."""
        found = self._graphs.get((batch, length))
        if found is not None:
            return found
        try:
            tokens, slots, positions = [t.to(self.device) for t in host]
            side = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):  # cuBLAS workspaces and lazy kernels before capture
                    self._compute(tokens, slots, positions, length, None)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._compute(tokens, slots, positions, length, None)
        except Exception as err:  # noqa: BLE001 - any capture failure: run eagerly from now on
            self.graph_failure = f"{type(err).__name__}: {err}"
            log.warning("model %r: CUDA graph capture failed, decoding eagerly: %s", self.config.name, err)
            return None
        found = self._graphs[(batch, length)] = _DecodeGraph(graph, tokens, slots, positions, logits)
        return found

    def _compute(
        self,
        tokens: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        total: int,
        one_slot: int | None,
        last: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model over device tensors: ``tokens`` and ``positions`` (rows, new), ``slots``
        (rows,); attention reads ``total`` positions of each row's slot (``one_slot``: the
        only row's, as a view). Returns float32 logits on the device of each row's last
        position, or of position ``last[row]`` (rows padded on the right)."""
        model, device = self._model, self.device
        assert self._cos is not None and self._sin is not None
        count, new = tokens.shape
        # Row b's query i (position p) sees keys 0..p of its own slot.
        mask = (torch.arange(total, device=device)[None, None, :] <= positions[:, :, None])[:, None]
        cos = self._cos[positions][:, None]  # (rows, 1, new, head size)
        sin = self._sin[positions][:, None]
        slot_index = slots[:, None].expand(count, new)

        hidden = model.model.embed_tokens(tokens)
        for layer, block in enumerate(model.model.layers):
            attn = block.self_attn
            normed = block.input_layernorm(hidden)
            q = attn.q_proj(normed).view(count, new, self._heads, self._head_dim).transpose(1, 2)
            k = attn.k_proj(normed).view(count, new, self._kv_heads, self._head_dim).transpose(1, 2)
            v = attn.v_proj(normed).view(count, new, self._kv_heads, self._head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            cache_k, cache_v = self._keys[layer], self._values[layer]
            # The new tokens' keys/values go into their slots at their positions, in place.
            cache_k[slot_index, :, positions] = k.transpose(1, 2)
            cache_v[slot_index, :, positions] = v
            if one_slot is not None:  # a view: no copy of the slot's cache
                keys = cache_k[one_slot : one_slot + 1, :, :total]
                values = cache_v[one_slot : one_slot + 1, :, :total]
            else:
                keys = cache_k[:, :, :total].index_select(0, slots)
                values = cache_v[:, :, :total].index_select(0, slots)
            context = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, enable_gqa=self._kv_heads != self._heads
            )
            hidden = hidden + attn.o_proj(context.transpose(1, 2).reshape(count, new, self._heads * self._head_dim))
            hidden = hidden + block.mlp(block.post_attention_layernorm(hidden))
        final = hidden[:, -1] if last is None else hidden[torch.arange(count, device=device), last]
        logits: torch.Tensor = model.lm_head(model.model.norm(final)).float()
        return logits


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
