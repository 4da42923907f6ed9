"""bench/fake_memory.py: the counted peak follows tensor lifetimes, views and in-place ops."""

from __future__ import annotations

import json

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hiflow_fast.bench import bench_transformer
from hiflow_fast.bench.fake_memory import count_peak_bytes

N = 1000  # fp32 elements: 4,000 bytes per full tensor


def test_counts_new_tensors_and_releases_dead_ones():
    def fn():
        a = torch.ones(N)  # 4,000
        b = a * 2  # 8,000 alive
        del a  # 4,000
        c = torch.empty(2 * N)  # 12,000 alive: the peak
        del c
        return b.sum()  # 4 bytes

    with FakeTensorMode():
        counted = count_peak_bytes(fn)
    assert counted.peak_bytes == 3 * 4 * N
    assert counted.retained_bytes == 0


def test_views_in_place_and_out_ops_add_nothing():
    with FakeTensorMode():
        existing = torch.zeros(N)

        def fn():
            existing.view(10, 100).mul_(3)  # a view of old memory, written in place
            torch.add(existing, 1.0, out=existing)
            existing.chunk(3)  # a Tensor[] of views: one schema return covers them all
            existing.unbind(0)
            return existing[::2]

        counted = count_peak_bytes(fn)
    assert counted.peak_bytes == 0


def test_memory_a_call_keeps_is_reported_as_retained():
    cache = []
    with FakeTensorMode():

        def fn():
            cache.append(torch.empty(N))
            return torch.empty(N)

        counted = count_peak_bytes(fn)
    assert counted.peak_bytes == 2 * 4 * N
    assert counted.retained_bytes == 4 * N


def test_transformer_count_memory_mode_writes_records(tmp_path):
    out = tmp_path / "count.json"
    status = bench_transformer.main(["--device", "cpu", "--cpu-allocator", "system", "--count-memory", "--quick",
                                     "--sizes", "256", "--paths", "stock,fast", "--json", str(out)])
    assert status == 0
    records = {r["path"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"stock", "fast"}
    for record in records.values():
        assert record["name"] == "transformer.full_forward_peak_counted" and record["median_s"] is None
        assert record["peak_bytes"] > 0 and record["method"].startswith("fake-tensor count")
    # The fused q/k norm + RoPE and the chunked MLP hold less than stock diffusers' fp32 q/k.
    assert records["fast"]["peak_bytes"] < records["stock"]["peak_bytes"]
    assert records["fast"]["saving_vs_stock_bytes"] == records["stock"]["peak_bytes"] - records["fast"]["peak_bytes"]
