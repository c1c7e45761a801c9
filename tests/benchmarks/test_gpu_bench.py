"""The GPU benchmark's pure parts: the variant repository, the ratios and the report."""

from __future__ import annotations

from pathlib import Path

import yaml

from taskserve.benchmarks.gpu_bench import Point, decode_entry, markdown, ratios, variant_repository


def test_variants_change_only_placement_batching_and_device(tmp_path: Path) -> None:
    source = tmp_path / "models" / "all-MiniLM-L6-v2-torch"
    (source / "1").mkdir(parents=True)
    (source / "1" / "torch_model.json").write_text("{}")
    config = {"name": "all-MiniLM-L6-v2-torch", "platform": "torch", "max_batch_size": 64,
              "dynamic_batching": {"max_queue_delay_us": 2000, "length_buckets": [16, 32]}}  # fmt: skip
    (source / "config.yaml").write_text(yaml.safe_dump(config))
    made = variant_repository(tmp_path / "models", tmp_path / "repo", ["gpu", "gpu-mbs1", "cpu"])
    assert made == {"minilm": [f"all-MiniLM-L6-v2-torch-{v}" for v in ("gpu", "gpu-mbs1", "cpu")]}
    read = {v: yaml.safe_load((tmp_path / "repo" / f"all-MiniLM-L6-v2-torch-{v}" / "config.yaml").read_text())
            for v in ("gpu", "gpu-mbs1", "cpu")}  # fmt: skip
    assert read["gpu"]["gpus"] == [0] and read["gpu"]["max_batch_size"] == 64 and "name" not in read["gpu"]
    assert read["gpu-mbs1"]["max_batch_size"] == 1 and "dynamic_batching" not in read["gpu-mbs1"]
    assert read["cpu"]["runtime"] == {"torch": {"device": "cpu"}} and "gpus" not in read["cpu"]
    assert (tmp_path / "repo" / "all-MiniLM-L6-v2-torch-cpu" / "1" / "torch_model.json").is_file()


def test_ratios_and_report() -> None:
    points = [
        Point("minilm", "gpu", 64, items_per_s=5000.0),
        Point("minilm", "gpu-mbs1", 64, items_per_s=800.0),
        Point("minilm", "cpu", 64, items_per_s=200.0),
        Point("efficientnet", "gpu", 64, items_per_s=3000.0),
        Point("smollm2", "decode", 1, items_per_s=100.0),
        Point("smollm2", "decode", 32, items_per_s=1500.0),
        # The CUDA-graph variant is reported beside the ratio, never in it.
        Point("smollm2", "decode-graphs", 1, items_per_s=400.0),
        Point("smollm2", "decode-graphs", 64, items_per_s=9000.0),
    ]
    found = ratios(points, 64)
    assert found == {
        "minilm_c64_batched_vs_mbs1": 6.25,
        "minilm_c64_gpu_fp16_vs_cpu": 25.0,
        "efficientnet_c64_gpu_fp16_vs_cpu": None,  # no CPU figure
        "smollm2_32_streams_vs_1": 15.0,
    }
    report = markdown({"name": "t", "failures": ["x not ready: reason\nlog"]}, points, found)
    assert "| minilm_c64_batched_vs_mbs1 | 6.25 | >= 5 | yes |" in report
    assert "| efficientnet_c64_gpu_fp16_vs_cpu | n/a | >= 20 | n/a |" in report
    assert "- failed: x not ready: reason" in report and "log" not in report.split("failed:")[1].splitlines()[0]


def test_the_decode_entry_has_room_for_every_stream_and_optional_graphs(tmp_path: Path) -> None:
    source = tmp_path / "SmolLM2-torch"
    (source / "1").mkdir(parents=True)
    (source / "1" / "torch_model.json").write_text("{}")
    generation = {"max_num_seqs": 16, "max_num_batched_tokens": 512}
    config = {"name": "SmolLM2-torch", "platform": "torch", "generation": generation}
    (source / "config.yaml").write_text(yaml.safe_dump(config))
    assert decode_entry(source, tmp_path / "eager", 32)["generation"]["max_num_seqs"] == 32
    decode_entry(source, tmp_path / "graphs", 32, cuda_graphs=True)
    eager = yaml.safe_load((tmp_path / "eager" / "config.yaml").read_text())
    graphs = yaml.safe_load((tmp_path / "graphs" / "config.yaml").read_text())
    assert "runtime" not in eager and graphs["runtime"] == {"torch": {"cuda_graphs": True}}
    assert "name" not in graphs  # served under its own directory name
    assert graphs["generation"] == {"max_num_seqs": 32, "max_num_batched_tokens": 512}
    assert (tmp_path / "graphs" / "1" / "torch_model.json").is_file()
    assert yaml.safe_load((source / "config.yaml").read_text()) == config  # the source entry is untouched

