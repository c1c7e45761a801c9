"""The generation peer comparison's pure parts: the streamed events of each server, the
equal-work check, stability, verdicts only from usable runs, and CPU use read from /proc.
(The servers themselves: tests/http/test_generation_peers.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.generation_peer_report import summarize
from taskserve.benchmarks.generation_peers import Prompt, equal_work, mark_stable, server_names, usable, window_run
from taskserve.benchmarks.openai_load import Completion, StreamParseError, StreamState, sse_data
from taskserve.benchmarks.proc_cpu import TICKS_PER_S, ProcStat, cores_busy, cpu_seconds, parse_stat, tree_ticks
from taskserve.benchmarks.stats import RunResult


def _feed(lines: list[str]) -> StreamState:
    state = StreamState()
    for i, line in enumerate(lines):
        payload = sse_data(line)
        if payload is not None:
            state.feed(payload, float(i))
    return state


# As llama.cpp's server streams /v1/completions: one event per token, the last with the
# finish reason, usage and its own timings (sent whether or not include_usage was asked).
LLAMA_CPP = [
    'data: {"choices":[{"text":"The","index":0,"logprobs":null,"finish_reason":null}],"object":"text_completion"}',
    "",
    'data: {"choices":[{"text":" sea","index":0,"logprobs":null,"finish_reason":null}],"object":"text_completion"}',
    "",
    'data: {"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"object":"text_completion",'
    '"usage":{"completion_tokens":2,"prompt_tokens":37,"total_tokens":39,"prompt_tokens_details":{"cached_tokens":0}},'
    '"id":"chatcmpl-95rn","timings":{"cache_n":0,"prompt_n":37,"predicted_n":2}}',
    "",
    "data: [DONE]",
]
# As taskserve's door (and vLLM) stream with include_usage: usage in a last chunk with no choices.
TASKSERVE = [
    'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"The","finish_reason":null}]}',
    "",
    ": a comment line",
    'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" sea","finish_reason":"length"}]}',
    'data: {"id":"cmpl-1","object":"text_completion","choices":[],'
    '"usage":{"prompt_tokens":37,"completion_tokens":2,"total_tokens":39}}',
    "data: [DONE]",
]


@pytest.mark.parametrize("lines", [LLAMA_CPP, TASKSERVE], ids=["llama.cpp", "taskserve"])
def test_both_servers_streams_give_the_same_counts_and_token_times(lines: list[str]) -> None:
    state = _feed(lines)
    assert state.done and state.prompt_tokens == 37 and state.generated == 2 and state.finish_reason == "length"
    completion = state.completion(started=-1.0, ended=10.0)
    # Only events carrying text are token arrivals (llama.cpp's closing event has none).
    assert completion.ttft_s == 1.0 and len(completion.gaps_s) == 1 and completion.gaps_s[0] > 0
    assert completion.total_s == 11.0 and completion.error is None


def test_a_chat_delta_counts_as_text() -> None:
    state = _feed(['data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}'])
    assert state.text_events == [0.0]


def test_an_error_event_or_garbage_fails_the_request() -> None:
    with pytest.raises(StreamParseError, match="error event: slot unavailable"):
        _feed(['data: {"error":{"message":"slot unavailable","code":503}}'])
    with pytest.raises(StreamParseError, match="not JSON"):
        _feed(["data: {half"])


def _prompts(*lengths: int) -> list[Prompt]:
    return [Prompt("x", tuple(range(n))) for n in lengths]


def _done(prompt_tokens: int, generated: int) -> Completion:
    return Completion(prompt_tokens, generated, 0.1, (0.01, 0.02), 1.0)


def test_equal_work_checks_every_request_against_its_prompt() -> None:
    prompts = _prompts(37, 40)
    assert equal_work([_done(37, 8), _done(40, 8)], prompts, 8) == "yes"
    # A tokenizer that adds a token, a request that stopped at end-of-sequence.
    off = equal_work([_done(38, 8), _done(40, 5)], prompts, 8)
    assert "1 request(s) read another prompt length (e.g. 38 tokens for 37)" in off
    assert "1 request(s) generated other than 8 (e.g. 5)" in off
    failed = Completion(-1, -1, 0.0, (), 0.5, "HTTPError: boom")
    assert equal_work([failed, failed], prompts, 8) == "no: nothing answered"


def _run(server: str, streams: int, repeat: int, wall: float, prompt_tokens: int = 37, generated: int = 8) -> RunResult:
    results = [_done(prompt_tokens, generated), _done(prompt_tokens, generated)]
    return window_run(server, streams, repeat, wall, results, _prompts(37, 37), 8, cores=1.9, others_cores=0.01)


def test_a_run_counts_generated_tokens_and_latencies() -> None:
    run = _run("taskserve", 2, 0, wall=2.0)
    assert run.extra["tokens_per_s"] == 8.0 and run.items_per_s == 8.0  # 16 tokens in 2 s
    assert run.extra["ttft_p50_ms"] == 100.0 and run.extra["itl_p99_ms"] == 20.0
    assert run.extra["equal_work"] == "yes" and run.extra["cores_busy"] == 1.9


def test_stability_needs_agreeing_repeats_and_verdicts_need_equal_work() -> None:
    runs = [_run("taskserve", 2, 0, 2.0), _run("taskserve", 2, 1, 2.1), _run("llama.cpp-f16", 2, 0, 1.0),
            _run("llama.cpp-f16", 2, 1, 2.0), _run("taskserve-int4", 2, 0, 1.0, prompt_tokens=38),
            _run("taskserve-int4", 2, 1, 1.0, prompt_tokens=38)]  # fmt: skip
    marked = mark_stable(runs, tolerance=0.10)
    assert [r.stable for r in marked] == [True, True, False, False, True, True]
    assert usable(marked[0]) is None
    assert "disagree" in str(usable(marked[2]))
    assert "unequal work" in str(usable(marked[4]))
    figures, lines = summarize(marked, usable)
    # The peer has no usable run: every comparison with it says so instead of giving a number.
    target = figures["targets"]["best_taskserve_vs_best_peer_2_streams"]
    assert target["value"] is None and "llama.cpp-f16" in target["why"]
    assert any(line.startswith("best_taskserve_vs_best_peer_2_streams: no verdict") for line in lines)
    assert figures["points"]["taskserve"]["2"]["usable_runs"] == 2


def test_verdicts_from_usable_runs() -> None:
    runs = mark_stable([_run("taskserve", 2, 0, 2.0), _run("taskserve", 2, 1, 2.0),
                        _run("llama.cpp-f16", 2, 0, 1.0), _run("llama.cpp-f16", 2, 1, 1.0)], 0.1)  # fmt: skip
    figures, _ = summarize(runs, usable)
    assert figures["targets"]["best_taskserve_vs_best_peer_2_streams"] == {
        "value": 0.5, "goal": 1.2, "met": False, "basis": "taskserve / llama.cpp-f16 tokens/s",
    }  # fmt: skip
    assert figures["targets"]["cores_busy_2_streams"]["met"] is True


def test_parse_stat_counts_fields_after_a_name_with_spaces_and_parentheses() -> None:
    line = "4242 (llama server) (x)) S 7 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3"
    assert parse_stat(line) == ProcStat(4242, 7, 300)


def test_a_tree_counts_its_live_descendants_only() -> None:
    stats = [ProcStat(1, 0, 1000), ProcStat(10, 1, 5), ProcStat(11, 10, 7), ProcStat(12, 1, 3), ProcStat(20, 2, 99)]
    assert tree_ticks(10, stats) == 12 and tree_ticks(1, stats) == 1015 and tree_ticks(5, stats) == 0


def test_cpu_use_of_a_real_child_process_is_read_from_proc() -> None:
    # A child that burns a known amount of CPU, then waits to be told to exit: while it is
    # alive only a tree walk sees its time (a parent's stat counts waited-for children only).
    burn = (
        "import sys, time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
        "print('burnt', flush=True)\nsys.stdin.read()"
    )
    before = cpu_seconds([os.getpid()])
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        after = cpu_seconds([os.getpid(), child.pid])
        busy = cores_busy(before, after, time.monotonic() - started)
    finally:
        child.communicate("")
    tick = 1 / TICKS_PER_S
    assert after[child.pid] >= 0.3 - 2 * tick
    assert after[os.getpid()] - before[os.getpid()] >= after[child.pid] - 2 * tick
    assert busy[child.pid] > 0


def test_cli_peer_mode_and_server_choice() -> None:
    args = build_parser().parse_args(["generation", "--model-repository", "/r", "--peer", "llama.cpp",
                                      "--servers", "taskserve,llama.cpp-f16"])  # fmt: skip
    assert args.peer == ["llama.cpp"] and server_names(args) == ["taskserve", "llama.cpp-f16"]
    args = build_parser().parse_args(["generation", "--model-repository", "/r", "--peer", "llama.cpp,vllm"])
    assert server_names(args) == [
        "taskserve", "taskserve-int8", "taskserve-int4", "llama.cpp-q4_1", "llama.cpp-f16", "vllm", "vllm-bf16",
        "vllm-bf16-b256",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="unknown --peer"):
        server_names(build_parser().parse_args(["generation", "--model-repository", "/r", "--peer", "tgi"]))
    with pytest.raises(ValueError, match="not among"):
        server_names(build_parser().parse_args(
            ["generation", "--model-repository", "/r", "--peer", "llama.cpp", "--servers", "vllm"]))


def test_results_json_holds_the_checks(tmp_path: Path) -> None:
    from taskserve.benchmarks.report import write_results

    run = _run("taskserve", 1, 0, 1.0)
    paths = write_results("g", [run], config={}, machine={}, out_dir=tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["runs"][0]["equal_work"] == "yes" and doc["runs"][0]["generated_per_request"] == "8"


def test_requests_per_run_caps_one_stream_runs_but_feeds_every_stream() -> None:
    from taskserve.benchmarks.generation_peers import requests_per_run

    assert requests_per_run(32, 1, 0) == 32  # default: every prompt
    assert requests_per_run(32, 1, 8) == 8
    assert requests_per_run(32, 8, 8) == 32 and requests_per_run(32, 32, 8) == 32
    assert requests_per_run(4, 8, 1) == 4 and requests_per_run(32, 8, 1) == 8
