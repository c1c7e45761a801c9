"""One repository of tiny models for the robustness tests (fault isolation, lifecycle,
limits, malformed messages, fuzzing, overload, version swaps), built once per run,
and one in-process server on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from onnx import TensorProto

from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import add_sub_graph, identity_graph, slow_graph, write_entry

TEXTCLS = "tiny-textcls"
SLOW_ROWS = "slow-rows"
# One instance, no batching, a short queue, ~10 ms per request: compute-bound, so the
# overload test's 4x rate stays within what the gRPC client and server carry.
SLOW_CONFIG = {
    "max_batch_size": 1,
    "dynamic_batching": {"max_queue_size": 16, "inline_compute_us": 0},
    # One compute thread: the other core stays with the event loops that answer (and refuse).
    "runtime": {"intra_op_threads": 1},
}


def rss_bytes() -> int:
    """This process's resident memory (the in-process server lives here)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="session")
def robust_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from taskserve.exporters.api import export_hf
    from tests.support import tiny_hf_models as tiny_models

    repo = tmp_path_factory.mktemp("robust-repo")
    # A real BERT graph (2 layers, 32 wide, 64 positions, its own vocabulary): the same
    # failure modes as all-MiniLM-L6-v2 (token ids past the vocabulary, sequences past
    # the positions, input_ids/attention_mask of different lengths) at a fraction of the cost.
    source = tiny_models.tiny_bert(tmp_path_factory.mktemp("robust-src") / TEXTCLS, "text-classification")
    export_hf(source, "text-classification", repo, TEXTCLS, progress=False, max_queue_delay_us=20_000)
    path = repo / TEXTCLS / "config.yaml"
    config = yaml.safe_load(path.read_text())
    # Always through the instance thread, so concurrent requests share batches.
    config["dynamic_batching"]["inline_compute_us"] = 0
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 500}})
    write_entry(repo, "slow", slow_graph(width=1024, depth=64), SLOW_CONFIG)
    # The same chain without a batch dimension: a request's row count sets its compute
    # (~5 ms a row on one thread here), so one request can outlast a client's deadline.
    write_entry(repo, SLOW_ROWS, slow_graph(width=1024, depth=64), {
        "max_batch_size": 0, "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1, 1024]}],
        "runtime": {"intra_op_threads": 1},
    })  # fmt: skip
    # Swapped to a new version again and again under load.
    write_entry(repo, "swap", add_sub_graph(), {"max_batch_size": 8, "dynamic_batching": {"max_queue_delay_us": 200}})
    write_entry(repo, "unknown-option", identity_graph(TensorProto.FLOAT, ["batch", 2]),
                {"max_batch_size": 4, "task": "text-classification", "task_options": {"top_kk": 3}})  # fmt: skip
    write_entry(repo, "wrong-option-type", identity_graph(TensorProto.FLOAT, ["batch", 2]),
                {"max_batch_size": 4, "task": "text-classification", "task_options": {"top_k": "three"}})  # fmt: skip
    return repo


@pytest.fixture(scope="session")
def robust_server(robust_repository: Path) -> Iterator[ServerThread]:
    with running_server(robust_repository, max_streams=4, model_control_mode="explicit") as server:
        yield server


@pytest.fixture(scope="session")
def robust_channel(robust_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(robust_server.address) as ch:
        yield ch
