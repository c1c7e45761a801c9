"""The --weights quality check (exporters/decoder_quality.py): greedy agreement and perplexity of
a quantized engine decoder against its float32 graph, both run through the server's runner;
an export that misses the tolerance is refused and writes nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import yaml
from onnx import numpy_helper

from taskserve.exporters import pipeline
from taskserve.exporters.api import export_hf
from taskserve.exporters.decoder_quality import (
    TEXT_FILE,
    TOLERANCES,
    DecoderQuality,
    QualityTolerance,
    agreed_prefixes,
    measure,
    misses,
)
from taskserve.exporters.errors import ValidationFailed
from tests.exporters.conftest import QUALITY_PLAN


def _measure(reference: Path, candidate: Path) -> DecoderQuality:
    config: dict[str, Any] = yaml.safe_load((candidate / "config.yaml").read_text())
    config["name"] = candidate.name
    positions = int(config["generation"]["max_model_len"])
    return measure(reference / "1" / "model.onnx", candidate / "1" / "model.onnx", config, candidate, QUALITY_PLAN,
                   positions)  # fmt: skip


def test_float32_against_itself_agrees_fully(weight_entries: dict[str, Path]) -> None:
    quality = _measure(weight_entries["fp32"], weight_entries["fp32"])
    assert quality.agreed == (16,) * 4 and quality.full_matches == 4 and quality.mean_agreement == 1.0
    assert quality.perplexity == quality.reference_perplexity and quality.top1_agreement == 1.0
    assert quality.text_tokens == 4 * (256 // 4 - 1)  # every window's tokens after its first
    assert 1.0 < quality.perplexity < math.inf
    assert misses(quality, QualityTolerance(16, 1.0, 0.0)) == []


def test_int4_against_float32_gives_measures_in_range(weight_entries: dict[str, Path]) -> None:
    quality = _measure(weight_entries["fp32"], weight_entries["int4"])
    assert all(0 <= a <= 16 for a in quality.agreed) and 0.0 <= quality.mean_agreement <= 1.0
    assert 0 <= quality.prefix_matches(4) <= 4 and 0.0 <= quality.top1_agreement <= 1.0
    assert 1.0 < quality.perplexity < math.inf and quality.perplexity != quality.reference_perplexity
    # The reference side is the same float32 graph as in the self-comparison.
    assert quality.reference_perplexity == _measure(weight_entries["fp32"], weight_entries["fp32"]).perplexity


def test_the_export_records_the_quality_check(weight_entries: dict[str, Path]) -> None:
    for mode in ("int8", "int4"):
        info = json.loads((weight_entries[mode] / "export-info.json").read_text())
        quality = info["quality"]
        assert quality["prompts"] == 4 and quality["new_tokens"] == 16 and len(quality["agreed"]) == 4
        assert quality["mean_agreement"] == pytest.approx(sum(quality["agreed"]) / 64)
        assert quality["tolerance"]["prefix_tokens"] == 4 and quality["misses"] == []
    assert "quality" not in json.loads((weight_entries["fp32"] / "export-info.json").read_text())


# Both parts missed whatever int4 does: all prompts equal over 16 tokens, and a perplexity
# halved (int4 on the tiny random model may even lower it a little).
UNREACHABLE = QualityTolerance(prefix_tokens=16, min_prefix_share=1.0, max_perplexity_increase=-0.5)


def _export(source: Path, out: Path, mode: str, tolerance: QualityTolerance, **options: Any) -> None:
    export_hf(source, "text-generation", out, mode, progress=False, weights=mode, quality_plan=QUALITY_PLAN,
              quality_tolerance=tolerance, **options)  # fmt: skip


def test_a_tiny_threshold_refuses_int4_and_writes_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationFailed) as err:
        _export(tiny_llama, tmp_path, "int4", UNREACHABLE)
    message = str(err.value)
    assert "greedy agreement" in message and "perplexity" in message and "--weights int8" in message
    assert not (tmp_path / "int4").exists()


def test_allow_quality_loss_writes_the_entry_with_the_misses_and_a_warning(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _export(tiny_llama, tmp_path, "int4", UNREACHABLE, allow_quality_loss=True)
    quality = json.loads((tmp_path / "int4" / "export-info.json").read_text())["quality"]
    assert len(quality["misses"]) == 2 and quality["tolerance"]["min_prefix_share"] == 1.0
    assert "WARNING: --weights int4 missed the quality tolerance" in capsys.readouterr().err  # said under --quiet too


def _broken(real: Any) -> Any:
    """``quantize_weights`` that then scrambles the token embedding table (rows shuffled)."""

    def quantize(src: Path, dst: Path, mode: str) -> int:
        count = int(real(src, dst, mode))
        model = onnx.load(str(dst))
        (table,) = [t for t in model.graph.initializer if t.name == "embed_tokens"]
        rows = numpy_helper.to_array(table)
        shuffled = rows[np.random.default_rng(0).permutation(len(rows))]
        table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(shuffled), table.name))
        onnx.save(model, str(dst))
        return count

    return quantize


def test_a_broken_quantization_misses_a_tolerance_int8_meets(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tolerance = QualityTolerance(prefix_tokens=4, min_prefix_share=0.5, max_perplexity_increase=0.5)
    _export(tiny_llama, tmp_path, "int8", tolerance)  # the threshold can be met
    assert (tmp_path / "int8" / "config.yaml").is_file()
    monkeypatch.setattr(pipeline, "quantize_weights", _broken(pipeline.quantize_weights))
    with pytest.raises(ValidationFailed, match="greedy agreement"):
        _export(tiny_llama, tmp_path, "int8", tolerance)
    assert (tmp_path / "int8" / "config.yaml").is_file()  # the earlier entry stays as it was


def test_agreed_prefix_and_misses() -> None:
    reference = np.asarray([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
    candidate = np.asarray([[1, 2, 3, 4], [1, 9, 3, 4], [0, 6, 7, 8]])
    assert agreed_prefixes(reference, candidate) == (4, 1, 0)  # equal tokens after a divergence do not count
    quality = DecoderQuality(3, 4, (4, 1, 0), 100, 10.0, 10.4, 0.9)
    assert quality.mean_agreement == pytest.approx(5 / 12) and quality.full_matches == 1
    assert quality.prefix_matches(1) == 2 and quality.perplexity_increase == pytest.approx(0.04)
    assert misses(quality, QualityTolerance(1, 0.6, 0.05)) == []
    assert len(misses(quality, QualityTolerance(1, 0.7, 0.05))) == 1  # 2 of 3 prompts < 70 %
    assert len(misses(quality, QualityTolerance(1, 0.6, 0.03))) == 1
    nan = DecoderQuality(3, 4, (4, 4, 4), 100, 10.0, float("nan"), 1.0)
    assert len(misses(nan, QualityTolerance(1, 0.0, 1.0))) == 1


def test_the_text_and_tolerances_ship_with_the_package() -> None:
    assert len(TEXT_FILE.read_text(encoding="utf-8").split()) > 2000
    assert set(TOLERANCES) == {"int4", "int8"}


def test_the_report_puts_the_entries_side_by_side(weight_entries: dict[str, Path], tmp_path: Path) -> None:
    from taskserve.exporters.quality_report import main

    out = tmp_path / "results" / "quantization-tiny"
    entries = [str(weight_entries["int8"]), str(weight_entries["int4"])]
    assert main([str(out), *entries, "--command", "taskserve-export x"]) == 0
    data = json.loads(out.with_name("quantization-tiny.json").read_text())
    assert list(data["weights"]) == ["int8", "int4"] and data["commands"] == ["taskserve-export x"]
    for mode in ("int8", "int4"):
        info = json.loads((weight_entries[mode] / "export-info.json").read_text())["quality"]
        assert data["weights"][mode]["agreed"] == info["agreed"]
    md = out.with_name("quantization-tiny.md").read_text()
    assert "| measure | float32 | int8 | int4 |" in md and "taskserve-export x" in md
    with pytest.raises(SystemExit):
        main([str(out), str(weight_entries["fp32"])])  # no quality block: nothing to report
