"""bench memory: the planner's estimated peak is never below the peak counted on fake tensors
(bench/fake_memory.py) for the whole cascade under the plan, at several sizes and budgets.

FLUX.1-dev width (hidden 3072, 512 text tokens) with few blocks, and the reduced VAE, so that a
count takes seconds; the 57-block, 4K count is `hiflow-fast bench memory --device cpu`."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast.bench.bench_memory import CASCADES, count_budgets, parse_budgets
from hiflow_fast.errors import HiFlowInputError

GIB = 2**30


@pytest.mark.parametrize(
    "cascade",
    [CASCADES["smoke"], ((256, 256), 4, ((512, 512),), (2,))],
    ids=["128-192-256", "256-512"],
)
def test_estimate_is_never_below_the_count(cascade):
    # Budgets from "everything resident" down to "every block streamed" and below, for 2 double
    # + 6 single blocks at FLUX width (2 x 0.63 + 6 x 0.26 GiB of weights).
    records = count_budgets([8, 3, 2.6, 2.3, 2.0], "full", cascade, {}, double=2, single=6, vae_model="reduced")
    planned = [r for r in records if r["plan"] is not None]
    assert len(planned) == 4 and "at least" in records[-1]["skipped"]
    residency = {tuple(r["resident_blocks_per_stage"]) for r in planned}
    assert len(residency) >= 3  # different plans really were counted (resident, partial, streamed)
    for r in planned:
        assert r["exact"] and r["counted_peak_gib"] > 0
        assert r["estimated_peak_gib"] >= r["counted_peak_gib"], r
        assert r["fits"] == (r["counted_peak_gib"] <= r["budget_gib"])


@pytest.mark.parametrize("bad", ["", "a,b", "8,-1", "0"])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(HiFlowInputError, match="--budgets"):
        parse_budgets(bad)


def test_gpu_variant_smoke_on_the_cpu():
    """The GPU benchmark's code path on a tiny model on the CPU: a resident record and one per
    budget and stage (no memory numbers without a GPU; a budget below the minimum is skipped)."""
    import argparse

    from hiflow_fast.bench.memory_gpu import run_gpu

    args = argparse.Namespace(sample_steps=1, gpu_stages="2k,4k")
    assert run_gpu(args, [8, 0.01], device="cpu", model_size="tiny") == 0


def test_gpu_variant_streams_from_host_memory_and_runs_the_lossy_plans(monkeypatch):
    """Its budget runs go the way of a budget-loaded pipeline (blocks host-origin), the fp8 plans too."""
    import argparse

    from hiflow_fast.bench import memory_gpu
    from hiflow_fast.block_streaming import BlockStreamer

    seen = []
    real_init = BlockStreamer.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        seen.append((self.host_origin, any(p.dtype == torch.float8_e4m3fn for p in self._original[0])))

    monkeypatch.setattr(BlockStreamer, "__init__", spy)
    args = argparse.Namespace(sample_steps=1, gpu_stages="4k", lossy=True)
    assert memory_gpu.run_gpu(args, [8], device="cpu", model_size="tiny") == 0
    assert seen == [(True, False), (True, True)]
