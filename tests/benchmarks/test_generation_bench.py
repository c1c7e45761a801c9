"""``taskserve-bench generation``'s plumbing: the sized repository, the decode rate, the verdicts.
(The measurement itself runs a real model; its smoke command is in docs/generation.md.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.generation_bench import StreamTiming, ratios_and_verdicts, write_engine_repository


def _entry(root: Path, generation: dict[str, int] | None) -> Path:
    entry = root / "src" / "m"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / "model.onnx").write_bytes(b"")
    config = {"name": "m", "task": "text-generation", "task_options": {"max_concurrent_generations": 8}}
    if generation is not None:
        config["generation"] = generation
    (entry / "config.yaml").write_text(yaml.safe_dump(config))
    return entry


def test_repository_is_sized_for_the_streams(tmp_path: Path) -> None:
    entry = _entry(tmp_path, {"max_num_seqs": 16, "max_num_batched_tokens": 20, "max_model_len": 512})
    repo = write_engine_repository(entry, "m", tmp_path / "work", streams=32, positions=1200)
    config = yaml.safe_load((repo / "m" / "config.yaml").read_text())
    assert config["generation"] == {"max_num_seqs": 32, "max_num_batched_tokens": 32, "max_model_len": 1200}
    assert config["task_options"]["max_concurrent_generations"] == 48
    assert (repo / "m" / "1" / "model.onnx").exists()


def test_a_batcher_entry_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="generation block"):
        write_engine_repository(_entry(tmp_path, None), "m", tmp_path / "work", streams=8, positions=100)


def test_decode_rate_leaves_out_the_first_token() -> None:
    assert StreamTiming(tokens=11, prompt_tokens=5, first_s=1.0, total_s=3.0).decode_tokens_per_s == 5.0
    assert StreamTiming(tokens=1, prompt_tokens=5, first_s=1.0, total_s=1.0).decode_tokens_per_s == 0.0


def test_verdicts_know_which_way_is_better() -> None:
    verdicts = ratios_and_verdicts({"streams_8_vs_1_tokens_per_s": 4.0, "ttft_p50_busy_vs_idle": 1.5})
    assert verdicts["streams_8_vs_1_tokens_per_s"].endswith("MISSED)")
    assert verdicts["ttft_p50_busy_vs_idle"].endswith("met)")


def test_cli_has_the_generation_mode() -> None:
    args = build_parser().parse_args(["generation", "--model-repository", "/r", "--streams", "1,8"])
    assert args.command == "generation" and args.streams == [1, 8] and args.long_context == 1000


def test_the_prefix_cache_switch_reaches_the_entrys_config(tmp_path: Path) -> None:
    entry = _entry(tmp_path, {"max_num_seqs": 16})
    for wanted in (True, False):
        repo = write_engine_repository(entry, "m", tmp_path / f"work-{wanted}", 32, 600, prefix_caching=wanted)
        assert yaml.safe_load((repo / "m" / "config.yaml").read_text())["generation"]["prefix_caching"] is wanted
    repo = write_engine_repository(entry, "m", tmp_path / "work-default", 32, 600)
    assert "prefix_caching" not in yaml.safe_load((repo / "m" / "config.yaml").read_text())["generation"]


def test_shared_prefix_prompts_share_the_system_prompt_and_differ_after_it(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from taskserve.benchmarks.generation_bench import shared_prefix_prompts

    words = sorted(set(_FILLER_WORDS))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    prompts = shared_prefix_prompts(path, 40, 4)
    system = prompts[0].split("\nQuestion")[0]
    assert len(tokenizer.encode(system).ids) == 40
    assert all(p.startswith(system + "\nQuestion") for p in prompts) and len(set(prompts)) == 4


def test_cli_has_the_shared_prefix_mode() -> None:
    args = build_parser().parse_args(
        ["generation", "--model-repository", "/r", "--shared-prefix-tokens", "500", "--prefix-cache", "off"]
    )
    assert args.shared_prefix_tokens == 500 and args.shared_prefix_streams == 32 and args.prefix_cache == "off"


_FILLER_WORDS = (
    "The history of the city begins with a small settlement on the river, where traders met to exchange "
    "grain, salt and wool. Over the centuries the market grew into a town, the town built walls, and the "
    "walls were torn down again when the railway arrived and the factories needed room."
).split()
