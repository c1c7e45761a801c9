"""How far a weight-quantized engine decoder (``--weights int4|int8``) moves from its float32
graph, measured through the server's own runner (``runtimes/onnx_decoder.py``, the code that
serves the entry) on both graphs, and the tolerance an export must meet.

Two measures, both against the float32 graph of the same export:

- **greedy agreement**: each of ``prompts`` prompts (``data/quality-prompts.txt``, rendered
  with the model's chat template when it has one, as the server renders chat messages) is
  decoded greedily for ``new_tokens`` tokens by each graph on its own (end-of-sequence
  ignored). A prompt's *agreed prefix* is the number of generated tokens equal before the
  first divergence. Reported: the mean agreed fraction (mean of prefix / new_tokens), the
  prompts fully equal, and the prompts whose first ``prefix_tokens`` tokens are equal.
- **perplexity** of each graph on a fixed public-domain text (``data/pride-and-prejudice-1-3.txt``),
  cut into ``windows`` consecutive windows of equal length scored side by side (one decode
  row per window, teacher-forced, each window from an empty cache); exp of the mean negative
  log-likelihood of every token after a window's first. Also the share of those positions
  where both graphs predict the same next token (teacher-forced top-1 agreement).

Both run as batched decode steps (one row per prompt or window), so the cost is about
``new_tokens + text_tokens / windows`` steps per graph.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.entry_config import build_config
from taskserve.exporters.errors import ExportError, ValidationFailed
from taskserve.exporters.progress import format_table
from taskserve.exporters.spec import ExportedModel

DATA_DIR = Path(__file__).parent / "data"
PROMPTS_FILE = DATA_DIR / "quality-prompts.txt"
TEXT_FILE = DATA_DIR / "pride-and-prejudice-1-3.txt"


@dataclass(frozen=True)
class QualityPlan:
    """How much the check computes (tests shrink it)."""

    prompts: int = 32
    new_tokens: int = 128
    # At most this many tokens of the text are scored, in ``windows`` windows side by side.
    text_tokens: int = 4096
    windows: int = 32

    def check(self) -> None:
        if min(self.prompts, self.new_tokens, self.text_tokens, self.windows) < 1:
            raise ExportError(f"the quality check's counts must be >= 1: {self}")


@dataclass(frozen=True)
class QualityTolerance:
    """What a quantized decoder must keep of its float32 graph's behaviour."""

    # The prompts whose first ``prefix_tokens`` greedy tokens equal the float32 graph's ...
    prefix_tokens: int
    # ... must be at least this share of the prompts;
    min_prefix_share: float
    # and the perplexity on the text may rise at most this much (0.05: 5 %).
    max_perplexity_increase: float


@dataclass(frozen=True)
class DecoderQuality:
    """The measurements; ``agreed[i]``: prompt i's agreed prefix, in tokens."""

    prompts: int
    new_tokens: int
    agreed: tuple[int, ...]
    text_tokens: int
    reference_perplexity: float
    perplexity: float
    top1_agreement: float

    @property
    def mean_agreement(self) -> float:
        return float(np.mean(self.agreed)) / self.new_tokens

    @property
    def full_matches(self) -> int:
        return sum(a == self.new_tokens for a in self.agreed)

    def prefix_matches(self, tokens: int) -> int:
        return sum(a >= min(tokens, self.new_tokens) for a in self.agreed)

    @property
    def perplexity_increase(self) -> float:
        return self.perplexity / self.reference_perplexity - 1.0

    def to_dict(self, tolerance: QualityTolerance | None = None) -> dict[str, Any]:
        data: dict[str, Any] = asdict(self)
        data["agreed"] = list(self.agreed)
        data["mean_agreement"] = self.mean_agreement
        data["full_matches"] = self.full_matches
        data["perplexity_increase"] = self.perplexity_increase
        if tolerance is not None:
            data["prefix_matches"] = self.prefix_matches(tolerance.prefix_tokens)
            data["tolerance"] = asdict(tolerance)
            data["misses"] = misses(self, tolerance)
        return data


# One bar for both modes: what may be served in place of float32. Chosen by measurement on
# SmolLM2-135M-Instruct (docs/export.md, benchmarks/results/quantization-SmolLM2-135M-Instruct.md):
# perplexity catches a quantization that hurts the model; greedy agreement is what users see,
# and drifts even at int8 on a model this small, whose two best tokens are often close.
ACCEPTED = QualityTolerance(prefix_tokens=32, min_prefix_share=0.25, max_perplexity_increase=0.05)
TOLERANCES = {"int8": ACCEPTED, "int4": ACCEPTED}


def misses(quality: DecoderQuality, tolerance: QualityTolerance) -> list[str]:
    """What ``quality`` misses of ``tolerance``, one sentence each; empty when it meets it."""
    found = []
    prefix = min(tolerance.prefix_tokens, quality.new_tokens)
    matched = quality.prefix_matches(prefix)
    if matched < tolerance.min_prefix_share * quality.prompts:
        found.append(
            f"greedy agreement: {matched} of {quality.prompts} prompts keep the float32 graph's first {prefix} "
            f"tokens; at least {math.ceil(tolerance.min_prefix_share * quality.prompts)} must"
        )
    if not quality.perplexity_increase <= tolerance.max_perplexity_increase:  # NaN misses too
        found.append(
            f"perplexity: {quality.perplexity:.4g} against float32's {quality.reference_perplexity:.4g} "
            f"({quality.perplexity_increase:+.2%}); at most {tolerance.max_perplexity_increase:+.2%} is accepted"
        )
    return found


def quality_table(mode: str, quality: DecoderQuality, tolerance: QualityTolerance) -> str:
    prefix = min(tolerance.prefix_tokens, quality.new_tokens)
    needed = math.ceil(tolerance.min_prefix_share * quality.prompts)
    rows = [
        (
            f"greedy: prompts equal over the first {prefix} tokens", quality.prompts, quality.prefix_matches(prefix),
            f">= {needed}",
        ),
        (f"greedy: prompts equal over all {quality.new_tokens} tokens", quality.prompts, quality.full_matches, ""),
        ("greedy: mean agreed prefix (fraction of tokens)", "1", f"{quality.mean_agreement:.3f}", ""),
        (
            f"perplexity on the text ({quality.text_tokens} tokens)", f"{quality.reference_perplexity:.4f}",
            f"{quality.perplexity:.4f} ({quality.perplexity_increase:+.2%})",
            f"<= {tolerance.max_perplexity_increase:+.1%}",
        ),
        ("teacher-forced top-1 agreement on the text", "1", f"{quality.top1_agreement:.3f}", ""),
    ]  # fmt: skip
    return format_table(("measure", "float32", mode, "tolerance"), rows)


# -- inputs ------------------------------------------------------------------------------


def _tokenizer_files(model_dir: Path) -> tuple[Any, Mapping[str, object]]:
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ExportError(f"the quality check needs the model's tokenizer.json, not found in {model_dir}")
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return Tokenizer.from_file(str(path)), config


def prompt_ids(model_dir: Path, count: int, name: str) -> list[list[int]]:
    """``count`` prompts (the file's, cycled), encoded as the server encodes them: chat
    messages through the model's chat template when it has one, plain text otherwise."""
    from taskserve.server.tasks.chat_template import ChatMessage, ChatTemplate, read_chat_template

    tokenizer, config = _tokenizer_files(model_dir)
    texts = [line for line in PROMPTS_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [texts[i % len(texts)] for i in range(count)]
    source = read_chat_template(model_dir, config, name)
    if source is None:
        return [list(tokenizer.encode(t, add_special_tokens=True).ids) for t in texts]
    template = ChatTemplate(source, config, name)
    rendered = [template.render([ChatMessage("user", t)]) for t in texts]
    return [list(tokenizer.encode(r, add_special_tokens=False).ids) for r in rendered]


def text_windows(model_dir: Path, plan: QualityPlan, max_len: int) -> np.ndarray:
    """The text's first ``plan.text_tokens`` tokens as ``plan.windows`` rows of equal length
    (at most ``max_len``, what a cache slot holds)."""
    tokenizer, _ = _tokenizer_files(model_dir)
    ids = tokenizer.encode(TEXT_FILE.read_text(encoding="utf-8"), add_special_tokens=False).ids
    length = min(len(ids), plan.text_tokens) // plan.windows
    length = min(length, max_len)
    if length < 2:
        raise ExportError(
            f"the quality text gives {len(ids)} tokens: too few for {plan.windows} windows of 2 tokens or more"
        )
    return np.asarray(ids[: length * plan.windows], np.int64).reshape(plan.windows, length)


# -- runs through the server's runner ------------------------------------------------------


def _runner(model_file: Path, config: Mapping[str, Any], slots: int, max_len: int) -> Any:
    """The server's ONNX engine runner on ``model_file`` with ``slots`` slots of ``max_len``."""
    from taskserve.server.repository.config import parse_model_config
    from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner

    data = dict(config)
    data["generation"] = {
        "max_num_seqs": slots, "max_num_batched_tokens": max(512, slots), "max_model_len": max_len,
        "prefill_chunk_size": 0,
    }  # fmt: skip
    name = str(data["name"])
    runner = OnnxDecoderRunner(model_file, parse_model_config(data, Path(name) / "config.yaml", name))
    runner.load()
    return runner


def greedy_tokens(runner: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> np.ndarray:
    """Each prompt's ``new_tokens`` greedy tokens, shape (prompts, new_tokens): all prompts
    prefilled in one step, then one batched decode row per prompt per step."""
    from taskserve.server.runtimes.generation import StepRow

    logits = runner.step([StepRow(slot, np.asarray(ids, np.int64), 0) for slot, ids in enumerate(prompts)])
    out = np.empty((len(prompts), new_tokens), np.int64)
    out[:, 0] = logits.argmax(-1)
    for t in range(1, new_tokens):
        rows = [StepRow(slot, out[slot, t - 1 : t], len(ids) + t - 1) for slot, ids in enumerate(prompts)]
        out[:, t] = runner.step(rows).argmax(-1)
    for slot in range(len(prompts)):
        runner.release(slot)
    return out


def scored_text(runner: Any, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced over each window (one decode row per window): the negative
    log-likelihood of every token after the first, and the token predicted there; both of
    shape (windows, length - 1)."""
    from taskserve.server.runtimes.generation import StepRow

    count, length = windows.shape
    nll = np.empty((count, length - 1), np.float64)
    predicted = np.empty((count, length - 1), np.int64)
    for t in range(length - 1):
        logits = runner.step([StepRow(w, windows[w, t : t + 1], t) for w in range(count)]).astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        nll[:, t] = log_z - logits[np.arange(count), windows[:, t + 1]]
        predicted[:, t] = logits.argmax(-1)
    for slot in range(count):
        runner.release(slot)
    return nll, predicted


def _run_graph(
    model_file: Path, config: Mapping[str, Any], prompts: list[list[int]], windows: np.ndarray, new_tokens: int,
    max_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    runner = _runner(model_file, config, max(len(prompts), len(windows)), max_len)
    try:
        tokens = greedy_tokens(runner, prompts, new_tokens)
        nll, predicted = scored_text(runner, windows)
    finally:
        runner.close()
    return tokens, nll, predicted


def agreed_prefixes(reference: np.ndarray, candidate: np.ndarray) -> tuple[int, ...]:
    """Per row: how many leading tokens are equal."""
    differs = reference != candidate
    first = np.where(differs.any(-1), differs.argmax(-1), reference.shape[-1])
    return tuple(int(n) for n in first)


def measure(
    reference_file: Path, candidate_file: Path, config: Mapping[str, Any], model_dir: Path, plan: QualityPlan,
    max_positions: int,
) -> DecoderQuality:  # fmt: skip
    """Compare the graph ``candidate_file`` with ``reference_file`` (both served with entry
    ``config``; the tokenizer and chat template from ``model_dir``); a cache slot holds at
    most ``max_positions`` positions."""
    plan.check()
    # A model of few positions generates at most half of them (the table says how many).
    new_tokens = min(plan.new_tokens, max_positions // 2)
    if new_tokens < 1:
        raise ExportError(f"the model's {max_positions} positions leave no room for the quality check")
    name = str(config["name"])
    # A prompt longer than the room left keeps its end (the part next to the reply).
    room = max_positions - new_tokens
    prompts = [ids[-room:] for ids in prompt_ids(model_dir, plan.prompts, name)]
    windows = text_windows(model_dir, plan, max_positions)
    max_len = max(max(len(p) for p in prompts) + new_tokens, windows.shape[1])
    server_log = logging.getLogger("taskserve.server")
    level = server_log.level
    server_log.setLevel(max(level, logging.WARNING))  # the runner logs each load at INFO
    try:
        ref_tokens, ref_nll, ref_pred = _run_graph(reference_file, config, prompts, windows, new_tokens, max_len)
        tokens, nll, pred = _run_graph(candidate_file, config, prompts, windows, new_tokens, max_len)
    finally:
        server_log.setLevel(level)
    return DecoderQuality(
        prompts=plan.prompts,
        new_tokens=new_tokens,
        agreed=agreed_prefixes(ref_tokens, tokens),
        text_tokens=int(nll.size),
        reference_perplexity=float(np.exp(ref_nll.mean())),
        perplexity=float(np.exp(nll.mean())),
        top1_agreement=float((ref_pred == pred).mean()),
    )


def check_export(
    exported: ExportedModel, name: str, mode: str, fp32_dir: Path, quantized_dir: Path, plan: QualityPlan,
    tolerance: QualityTolerance | None = None, allow_loss: bool = False,
) -> tuple[dict[str, Any], str]:  # fmt: skip
    """The export pipeline's check of a ``--weights mode`` engine decoder (graphs in ``fp32_dir``
    and ``quantized_dir``): the measurements for export-info.json (``misses`` lists what the
    tolerance found missing) and the table. When ``tolerance`` (default: ``TOLERANCES[mode]``)
    is missed it raises ValidationFailed, so nothing is written, unless ``allow_loss``."""
    tolerance = tolerance or TOLERANCES[mode]
    if exported.generation is None or "tokenizer.json" not in exported.extra_files:
        raise ExportError(f"--weights {mode}: the quality check needs an engine decoder with its tokenizer.json")
    config = build_config(exported, name, 0, 0, int8=True)
    file = exported.onnx_files[0]
    model_dir = exported.extra_files["tokenizer.json"].parent
    max_positions = int(exported.generation["max_model_len"])
    measured = measure(fp32_dir / file, quantized_dir / file, config, model_dir, plan, max_positions)
    table = quality_table(mode, measured, tolerance)
    missed = misses(measured, tolerance)
    if missed and not allow_loss:
        raise ValidationFailed(
            f"--weights {mode} moves the model too far from float32: {'; '.join(missed)}.\n{table}\n"
            "Export with --weights int8 or without --weights (float32); --allow-quality-loss writes it anyway."
        )
    return measured.to_dict(tolerance), table
