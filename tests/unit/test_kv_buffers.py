"""The ONNX decoder runner's KV buffers map memory 4 KiB at a time as slots are first written:
a prefix copy into a fresh slot (the prefix cache) touches a few pages per layer and head.
np.zeros asked for transparent huge pages, and each first write zeroed 2 MiB pages instead."""

from __future__ import annotations

import numpy as np

from taskserve.server.runtimes.onnx_decoder import lazy_zeros


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_buffers_are_zeroed_and_writable() -> None:
    buffer = lazy_zeros((4, 3, 16, 8))
    assert buffer.dtype == np.float32 and buffer.shape == (4, 3, 16, 8) and not buffer.any()
    buffer[1, :, :5] = 2.0
    assert float(buffer.sum()) == 2.0 * 3 * 5 * 8


def test_first_writes_into_fresh_slots_map_only_the_pages_they_touch() -> None:
    # SmolLM2's shape: 32 slots x 3 KV heads x 2,048 positions x 64 (1.5 MiB per slot).
    buffer = lazy_zeros((32, 3, 2048, 64))
    before = _rss_bytes()
    for slot in range(16):
        buffer[slot, :, :40] = 1.0  # 40 positions: 10 KiB per head
    grown = _rss_bytes() - before
    # 16 slots x 3 heads x 3 pages is under 1 MiB; a 2 MiB page per slot would be 32 MiB.
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB mapped by 16 small writes"
