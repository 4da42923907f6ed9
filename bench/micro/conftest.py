"""Micro-benchmarks (pytest-benchmark): every Triton op against its hiflow_fast.ref reference.

    pytest bench/micro --benchmark-only                      # CPU: reference and interpreter, small shapes
    pytest bench/micro --benchmark-only --micro-size flux    # GPU: Flux shapes (the default on CUDA)
    pytest bench/micro --benchmark-only --micro-records OUT.json --micro-markdown OUT.md

Not collected by the plain `pytest` run (pyproject's testpaths is tests/). Files are
bench_micro_<op>.py, one per op; this conftest collects them (pytest's own pattern is test_*.py).

Timing and floors are bench/common's, as in every bench_*.py: each case is timed by
`common.measure_time` (do_bench / CUDA events on a GPU, perf_counter on the CPU) and its floor is
the op's bytes at the measured copy bandwidth (`common.copy_bandwidth`) or its FLOPs at the
measured matmul rate (`common.matmul_rate`), whichever is larger; extra_info carries median_s,
floor_s and fraction_of_floor (= floor / median). pytest-benchmark's own table times the same
call through `benchmark.pedantic` with a clock that synchronises the GPU first on CUDA.
`--micro-records` writes the bench/common records case by case (bench/gpu_check's JSON).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # The kernels must be defined under Triton's interpreter: before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

SIZES = ("tiny", "cpu", "flux")
# Timed repeats per size (bench/common's measure_time), and pytest-benchmark's rounds.
REPEATS = {"tiny": 1, "cpu": 5, "flux": 20}
# The smoke test's floors: a 4 MiB copy and a 256^3 matmul instead of bench/common's defaults
# (64 MiB and 1024^3 on a CPU), which would take most of its time.
TINY_FLOOR_BYTES, TINY_MATMUL_N = 4 * 2**20, 256


def pytest_addoption(parser):
    group = parser.getgroup("hiflow micro-benchmarks")
    group.addoption(
        "--micro-size",
        choices=SIZES,
        default=None,
        help="shapes: tiny (the smoke test), cpu (the CPU default), flux (the GPU default)",
    )
    group.addoption("--micro-records", type=Path, default=None, help="write bench/common records (JSON list) here, case by case")
    group.addoption("--micro-markdown", type=Path, default=None, help="write a markdown table of the cases here at the end")
    group.addoption("--micro-overwrite", action="store_true", default=False, help="replace existing --micro-records/--micro-markdown files")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_micro_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def cuda_synchronized_clock() -> float:
    """perf_counter after the GPU's queued work: pytest-benchmark's timer on CUDA."""
    torch.cuda.synchronize()
    return time.perf_counter()


def pytest_collection_modifyitems(config, items):
    # Flash attention last: on a GPU its first call autotunes (compiles every config), and
    # bench/gpu_check's step budget should go to the other ops first.
    items.sort(key=lambda item: "flash_attention" in item.nodeid)
    if torch.cuda.is_available():
        for item in items:
            item.add_marker(pytest.mark.benchmark(timer=cuda_synchronized_clock))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def size(pytestconfig, device) -> str:
    return pytestconfig.getoption("--micro-size") or ("flux" if device.type == "cuda" else "cpu")


class MicroRun:
    """Floors, environment and outputs shared by every case of the session."""

    def __init__(self, config, device: torch.device, size: str):
        from hiflow_fast.bench import common

        self.common, self.device, self.size = common, device, size
        self.repeats = REPEATS[size]
        if device.type == "cpu":
            common.retain_freed_memory()  # as every CPU benchmark does (see bench/common)
        self.environment = common.run_environment(device)
        self.outputs = common.Outputs(
            config.getoption("--micro-records"), config.getoption("--micro-markdown"), overwrite=config.getoption("--micro-overwrite")
        )
        self._bandwidth: float | None = None
        self._rates: dict[torch.dtype, float] = {}

    def bandwidth(self) -> float:
        if self._bandwidth is None:
            kwargs = {"nbytes": TINY_FLOOR_BYTES} if self.size == "tiny" else {}
            self._bandwidth = self.common.copy_bandwidth(self.device, **kwargs)
        return self._bandwidth

    def matmul_rate(self, dtype: torch.dtype) -> float:
        if dtype not in self._rates:
            # A CPU has no fast bf16/fp16 matmul worth a floor; fp32 stands in there.
            n = TINY_MATMUL_N if self.size == "tiny" else None
            self._rates[dtype] = self.common.matmul_rate(self.device, dtype if self.device.type == "cuda" else torch.float32, n=n)
        return self._rates[dtype]

    def floor_s(self, *, nbytes: int = 0, flops: float = 0.0, dtype: torch.dtype = torch.float32) -> float:
        """The op's floor: its bytes at the copy bandwidth or its FLOPs at the matmul rate."""
        floors = [nbytes / self.bandwidth()] if nbytes else []
        if flops:
            floors.append(flops / self.matmul_rate(dtype))
        return max(floors)

    def run(self, benchmark, op: str, path: str, fn, *, nbytes: int = 0, flops: float = 0.0, dtype=torch.float32, **shape):
        """Time fn() with bench/common (the record) and pytest-benchmark (its table)."""
        common = self.common
        floor_s = self.floor_s(nbytes=nbytes, flops=flops, dtype=dtype)
        facts = dict(label=f"{op} {path}", size=self.size, bytes_floor=nbytes or None, flops=flops or None,
                     dtype=str(dtype).removeprefix("torch."), **shape)
        try:
            timing = common.measure_time(fn, self.device, repeats=self.repeats, warmup=1)
        except Exception as exc:  # recorded as skipped with the reason (as every bench does), then the test fails
            self.outputs.add([common.make_record(f"micro_{op}", self.device, path, None, None, self.environment,
                                                 skipped=common.case_skip_reason(exc), **facts)])
            raise
        record = common.make_record(f"micro_{op}", self.device, path, timing, None, self.environment, floor_s=floor_s, **facts)
        self.outputs.add([record])
        benchmark.extra_info.update(
            size=self.size, median_s=timing.median_s, floor_s=floor_s, fraction_of_floor=record["fraction_of_floor"], **shape
        )
        # Already warm (compiled, autotuned) from measure_time's calls.
        benchmark.pedantic(fn, rounds=self.repeats, warmup_rounds=0, iterations=1)
        return record

    def packed(self, batch: int, hw: tuple[int, int], channels: int, *, g: torch.Generator) -> torch.Tensor:
        """A random packed Flux latent [B, (h/2)(w/2), 4C] in fp32 on the run's device."""
        return torch.randn(batch, (hw[0] // 2) * (hw[1] // 2), 4 * channels, generator=g).to(self.device)

    def finish(self) -> None:
        common = self.common
        rows = [dict(r, op=r["name"].removeprefix("micro_")) for r in self.outputs.records]
        table = common.markdown_table(
            rows, [("op", "op"), ("path", "path"), ("median s", "median_s"), ("floor s", "floor_s"), ("fraction of floor", "fraction_of_floor")]
        )
        heading = common.device_heading(self.environment, self.device)
        self.outputs.finish(f"# micro ({self.size} shapes)\n\n{heading}\n\n{table}\n", title="micro-benchmarks")


# (batch, channels, latent grid) of the low-pass ops' difference: the swin-padded 4K latent on a GPU.
LOWPASS_SHAPES = {"tiny": (1, 4, (8, 10)), "cpu": (1, 16, (66, 66)), "flux": (1, 16, (514, 514))}


@pytest.fixture
def latent_difference(size, device) -> torch.Tensor:
    """A random fp32 difference [B, C, H, W] for the low-pass ops (spectral, haar)."""
    batch, channels, hw = LOWPASS_SHAPES[size]
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, *hw, generator=g).to(device)


@pytest.fixture(scope="session")
def micro(pytestconfig, device, size):
    run = MicroRun(pytestconfig, device, size)
    yield run
    run.finish()

