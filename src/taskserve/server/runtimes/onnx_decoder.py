"""The ONNX Runtime ``DecoderRunner`` (``runtimes/generation.py``) over the engine's
decoder graph (``taskserve-export``'s ``exporters/engine_graph.py``), with the KV cache
resident in preallocated per-slot host buffers.

Per layer one key and one value buffer of shape (max_slots, kv heads, max_model_len,
head size), bound with ``IOBinding`` as both the graph's ``past_*`` input and its
``present_*`` output: the attention kernel (``GroupQueryAttention``) writes the new
tokens' keys/values in place and reads only each row's own positions, so a step
copies nothing else. The buffers are anonymous memory maps (``lazy_zeros``), whose pages
the OS maps on first write, 4 KiB at a time: memory grows with the positions actually used,
and a first write into a fresh slot costs little. (``np.zeros`` asks for transparent huge
pages on arrays this large, and then a first write into a fresh slot, such as a prefix
copy, made the kernel zero a 2 MiB page for every layer and head it touched.) A slot range is bound by
address (an offset into the buffer), so a step creates no per-layer OrtValues, and a
range's binding is kept for the steps after it (``_cache_binding``).

The graph is float32, and ONNX Runtime's CUDA ``GroupQueryAttention`` takes float16 and
bfloat16 only: under the CUDA provider that node would run on the CPU anyway, so the
cache stays in host memory. On a GPU, decoders run on the engine as torch entries
(``runtimes/torch_decoder.py``), whose cache lives on the device.

Decode rows (one token each) run as one model call over the slot range they span;
slots in that range without a decode row (free, or halfway through their prompt) ride
along as dummy rows that write past their own length, where the next real step
overwrites.

Prefill: the first chunks of several sequences (``start == 0``) run as one call, padded on
the right to the longest; a continuing chunk (``start > 0``) runs as a call of its own.
That is what ``GroupQueryAttention`` allows: a call whose rows hold more than one new
token and a past (``total_sequence_length`` > the new tokens) must have one row (ONNX
Runtime refuses "batch_size must be 1 when sequence_length > 1 and past context is
given"), while a call of first chunks (every row's total the padded length, no past)
takes any number of rows. A padded row's extra tokens are computed as its own: their
keys/values land past the row's prompt, in its own slot, where no real query looks and
the next real token overwrites them (``seqlens_k`` is the padded length minus one for
every row, so each row's positions start at 0); ``logits_index`` then takes each row's
logits at its last real token. The call spans a contiguous slot range, so a slot between
two first chunks must be free (nothing cached) to ride along; and, as the torch runner,
a chunk less than half the longest pays for padding it does not use, so the rows split
into calls where the padding would exceed the real tokens. Graphs exported before
``logits_index`` (last-position logits only) run each prefill chunk as its own call.
"""

from __future__ import annotations

import collections
import logging
import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes import onnx_providers
from taskserve.server.runtimes.generation import SlotCacheRunner, StepRow, check_decoder_rows
from taskserve.server.runtimes.onnx import OnnxRuntime

log = logging.getLogger(__name__)

# Graph metadata the exporter writes: positions its rotary tables cover.
MAX_POSITIONS_KEY = "taskserve.max_positions"
# The graph input naming the positions whose logits it returns (flat indices into batch x sequence).
LOGITS_INDEX = "logits_index"
# Slot ranges whose cache binding is kept (``_cache_binding``): the decode range and a few prefill ones.
BINDINGS_KEPT = 8


def lazy_zeros(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed float32 array over an anonymous memory map: no huge-page advice, so its pages
    are mapped (and zeroed) 4 KiB at a time as they are first written."""
    size = int(np.prod(shape)) * np.dtype(np.float32).itemsize
    return np.frombuffer(mmap.mmap(-1, max(size, 1)), np.float32, int(np.prod(shape))).reshape(shape)


class OnnxDecoderRunner(SlotCacheRunner):
    def __init__(self, model_path: Path, config: ModelConfig, gpu: int | None = None) -> None:
        if config.generation is None:
            raise RuntimeFailure(f"model {config.name!r} has no generation block; it is not an engine model")
        self._settings = config.generation
        if "allow_spinning" not in config.runtime.model_fields_set:
            # The engine's session runs its steps back to back on its own thread and is the one
            # model computing: spin-waiting threads skip a wake-up per operator (hundreds per step).
            # An explicit runtime.allow_spinning in config.yaml still decides.
            config = config.model_copy(update={"runtime": config.runtime.model_copy(update={"allow_spinning": True})})
        self.config = config
        self.runtime = OnnxRuntime(model_path, config, gpu)
        self._session: Any = None
        self._keys: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._bindings: collections.OrderedDict[tuple[int, int], Any] = collections.OrderedDict()

    # -- lifecycle -------------------------------------------------------------------------

    def load(self) -> None:
        self.runtime.load()
        session = self.runtime.session
        names = {i.name: i for i in session.get_inputs()}
        layers = sorted(int(n.split(".")[1]) for n in names if n.startswith("past_key."))
        required = {"input_ids", "seqlens_k", "total_sequence_length"}
        if not layers or not required <= set(names) or layers != list(range(len(layers))):
            raise RuntimeFailure(
                f"model {self.config.name!r}: the graph lacks the engine's inputs (input_ids, seqlens_k, "
                "total_sequence_length, past_key.N); re-export it: taskserve-export hf MODEL_DIR --task "
                f"text-generation --out REPOSITORY --name {self.config.name}"
            )
        shape = names["past_key.0"].shape
        kv_heads, head_dim = shape[1], shape[3]
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            raise RuntimeFailure(
                f"model {self.config.name!r}: past_key.0 has shape {shape}; heads and head size must be fixed"
            )
        meta = session.get_modelmeta().custom_metadata_map
        covered = int(meta.get(MAX_POSITIONS_KEY, "0") or 0)
        wanted = self._settings.max_model_len
        if covered and wanted > covered:
            raise RuntimeFailure(
                f"model {self.config.name!r}: generation.max_model_len {wanted} exceeds the {covered} positions "
                "the exported graph covers; lower it or re-export"
            )
        self._positions = wanted
        self._slots = self._settings.max_num_seqs
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        self._vocab = int(logits.shape[-1]) if isinstance(logits.shape[-1], int) else 0
        # Graphs since batched prefill return the logits of the positions this input names.
        self._indexed = LOGITS_INDEX in names
        cache = (self._slots, kv_heads, self._positions, head_dim)
        self._keys = [lazy_zeros(cache) for _ in layers]
        self._values = [lazy_zeros(cache) for _ in layers]
        self._lengths = np.zeros(self._slots, np.int64)
        self._bindings.clear()  # bound to the buffers just replaced
        self._session = session
        if onnx_providers.uses_cuda(self.runtime.providers):
            log.warning(
                "model %r: the engine graph is float32, and ONNX Runtime's CUDA GroupQueryAttention takes "
                "float16/bfloat16 only, so its attention runs on the CPU with copies every step; for generation "
                "on a GPU export the model with --format torch (docs/gpu.md)",
                self.config.name,
            )
        log.info(
            "model %r: %d cache slots of %d positions, %d layers (%.0f MiB reserved, mapped as used)",
            self.config.name, self._slots, self._positions, len(layers), self.cache_bytes / 2**20,
        )  # fmt: skip

    def close(self) -> None:
        self._session = None
        self._bindings.clear()
        self._keys, self._values = [], []
        self.runtime.close()

    # -- DecoderRunner -----------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        return sum(b.nbytes for b in self._keys) + sum(b.nbytes for b in self._values)

    @property
    def description(self) -> str:
        return f"{self.runtime.description}, resident KV cache ({self._slots} slots x {self._positions} positions)"

    def step(self, rows: Sequence[StepRow]) -> np.ndarray:
        if self._session is None:
            raise RuntimeFailure(f"model {self.config.name!r} is not loaded")
        check_decoder_rows(self.config.name, rows, self._positions, self._lengths, self._vocab)
        out = np.empty((len(rows), self._vocab), np.float32)
        decode = [i for i, r in enumerate(rows) if len(r.tokens) == 1]
        if decode:
            out[decode] = self._decode([rows[i] for i in decode])
            self._record([rows[i] for i in decode])
        prefill = [i for i, r in enumerate(rows) if len(r.tokens) > 1]
        first = sorted((i for i in prefill if rows[i].start == 0), key=lambda i: rows[i].slot)
        # Each call's rows are recorded before the next is planned: a later call's window
        # may take only slots that hold nothing (free, or not yet computed).
        for group in self._first_chunk_calls([rows[i] for i in first]) if self._indexed else []:
            out[[first[k] for k in group]] = self._prefill_together([rows[first[k]] for k in group])
            self._record([rows[first[k]] for k in group])
        for i in prefill:
            row = rows[i]
            if row.start == 0 and self._indexed:
                continue  # done above
            out[i] = self._prefill_together([row])[0]
            self._record([row])
        return out

    # -- execution -------------------------------------------------------------------------

    def _record(self, rows: Sequence[StepRow]) -> None:
        for row in rows:
            self._lengths[row.slot] = row.start + len(row.tokens)

    def _first_chunk_calls(self, rows: list[StepRow]) -> list[list[int]]:
        """First chunks, sorted by slot, split into calls (indices into ``rows``): a call spans
        a contiguous slot range whose other slots hold nothing, padded to its longest chunk,
        with at most as many padding tokens as real ones."""
        calls: list[list[int]] = []
        for k, row in enumerate(rows):
            if calls:
                call = calls[-1]
                lo, previous = rows[call[0]].slot, rows[call[-1]].slot
                longest = max(len(row.tokens), *(len(rows[j].tokens) for j in call))
                real = len(row.tokens) + sum(len(rows[j].tokens) for j in call)
                gap_free = not self._lengths[previous + 1 : row.slot].any()
                if gap_free and (row.slot + 1 - lo) * longest <= 2 * real:
                    call.append(k)
                    continue
            calls.append([k])
        return calls

    def _prefill_together(self, rows: list[StepRow]) -> np.ndarray:
        """Prefill chunks as one call over the slots [first row's, last row's]: first chunks
        padded on the right to the longest, or one continuing chunk (module doc)."""
        lo, hi = rows[0].slot, rows[-1].slot + 1
        width = max(len(r.tokens) for r in rows)
        tokens = np.zeros((hi - lo, width), np.int64)
        totals = np.full(hi - lo, width, np.int64)  # free slots in the range ride as first chunks too
        index = []
        for row in rows:
            n = len(row.tokens)
            tokens[row.slot - lo, :n] = row.tokens
            totals[row.slot - lo] = row.start + width
            index.append((row.slot - lo) * width + n - 1)
        return self._run(lo, hi, tokens, totals, np.asarray(index, np.int64))

    def _decode(self, rows: list[StepRow]) -> np.ndarray:
        lo = min(r.slot for r in rows)
        hi = max(r.slot for r in rows) + 1
        tokens = np.zeros((hi - lo, 1), np.int64)
        # Dummy rows write at their own next position, which their next real step overwrites.
        totals = self._lengths[lo:hi] + 1
        if int(totals.max()) > self._positions:
            totals = np.minimum(totals, self._positions)  # a full slot in the range is a finished one
        index = []
        for row in rows:
            tokens[row.slot - lo, 0] = int(row.tokens[0])
            totals[row.slot - lo] = row.start + 1
            index.append(row.slot - lo)
        return self._run(lo, hi, tokens, totals, np.asarray(index, np.int64))

    def _cache_binding(self, lo: int, hi: int) -> Any:
        """An IOBinding with slots [lo, hi) of every cache buffer bound by address, as the past
        input and the present output both, so the kernel updates the cache in place. Binding
        them is hundreds of calls into ONNX Runtime (the GIL held throughout), and consecutive
        steps mostly span the same slots, so the few most recent ranges keep their binding; a
        call rebinds only its own small inputs and its logits."""
        binding = self._bindings.get((lo, hi))
        if binding is not None:
            self._bindings.move_to_end((lo, hi))
            return binding
        binding = self._session.io_binding()
        for layer, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
            for kind, buffer in (("key", keys), ("value", values)):
                view = buffer[lo:hi]
                shape, address = list(view.shape), view.ctypes.data
                binding.bind_input(f"past_{kind}.{layer}", "cpu", 0, np.float32, shape, address)
                binding.bind_output(f"present_{kind}.{layer}", "cpu", 0, np.float32, shape, address)
        self._bindings[(lo, hi)] = binding
        if len(self._bindings) > BINDINGS_KEPT:
            self._bindings.popitem(last=False)
        return binding

    def _run(self, lo: int, hi: int, tokens: np.ndarray, totals: np.ndarray, index: np.ndarray) -> np.ndarray:
        """One model call over slots [lo, hi): ``tokens`` (rows, n) new tokens, ``totals`` the
        positions each row holds afterwards; returns the logits at ``index`` (flat indices
        into rows x n), one row each."""
        binding = self._cache_binding(lo, hi)
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(tokens, np.int64))
        binding.bind_cpu_input("seqlens_k", (totals - 1).astype(np.int32))
        binding.bind_cpu_input("total_sequence_length", np.asarray(int(totals.max()), np.int32))
        if self._indexed:
            binding.bind_cpu_input(LOGITS_INDEX, np.ascontiguousarray(index, np.int64))
        logits = np.empty((len(index) if self._indexed else hi - lo, self._vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        try:
            self._session.run_with_iobinding(binding)
        except Exception as err:
            raise RuntimeFailure(f"onnxruntime failed on model {self.config.name!r}: {err}") from err
        # A graph without logits_index returns each row's last position (its calls have no padding).
        return logits if self._indexed else logits[index // tokens.shape[1]]

    # -- prefix cache ----------------------------------------------------------------------

    def _copy_positions(self, src: int, dst: int, positions: int) -> None:
        for buffer in (*self._keys, *self._values):
            buffer[dst, :, :positions] = buffer[src, :, :positions]
