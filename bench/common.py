"""The one bench harness: timing, peak memory, the two floors, run facts, records and outputs.

Every bench_*.py measures through this module and nothing else:

* Timing (`measure_time`, `time_slow`, `measure_interleaved`): median / min / max over
  warmed-up repeats (interleaved across paths where a ratio of paths is the result). On a GPU,
  `measure_time` uses `triton.testing.do_bench` for ops under SLOW_CALL_S (CUDA events, L2
  flushed between runs, topped up with plain event timings when a slow op gets few samples);
  `time_slow` and longer ops: CUDA events around each call and no flush. On the CPU both are
  perf_counter around each call.
* Peak memory (`PeakMemory`, `peak_extra_bytes`): GPU: the caching allocator's peak statistics.
  CPU: either torch.profiler's memory timeline (c10 allocations only, exact for small ops; slow)
  or the process's peak resident set (VmHWM, reset through /proc/self/clear_refs; cheap, for
  ops of seconds).
* Floors (`copy_bandwidth`, `matmul_rate`): bytes at the copy bandwidth and FLOPs at the dense
  matmul rate, both *measured* in the run, so a result reads as `fraction_of_floor` = floor /
  median (1.0 = at the floor).
* Run facts (`run_environment`, `nvml_snapshot`, `device_heading`): versions, git commit,
  device name and NVML clocks/power/memory (None, never an error, without a GPU or NVML).
* CPU allocator (`--cpu-allocator`, `retain_freed_memory`): by default a CPU run keeps freed
  memory in the process, as CUDA's caching allocator does on a GPU, so that no path is timed
  paying the kernel for fresh pages (see `retain_freed_memory`); `system` leaves glibc as is.
* Failures (`case_skip_reason`): a case that raises is recorded as skipped with the reason, and
  the benchmark goes on; out of memory is a result, any other error makes the exit status 1.
* Records (`make_record`) and outputs (`Outputs`): one JSON object per measured case with the
  common keys name, device, latent_hw (where relevant), path, median_s, min_s, max_s, repeats,
  peak_bytes, floor_s / fraction_of_floor (where there is a floor), versions, commit,
  device_name; the JSON list, the markdown and the plot are written through
  `hiflow_fast.io.atomic_write` and never replace an existing file without --overwrite (checked
  before anything is measured).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch

from hiflow_fast.errors import HiFlowInputError, is_out_of_memory

# ---- timing ---------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds of one measured operation over its timed repeats."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    samples: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, samples: list[float]) -> "Timing":
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), list(samples))


# An op of at least this many seconds is timed call by call with CUDA events, without do_bench's
# estimation and L2 flush: at 20 ms an L2 of 50 MB is re-read in well under 1% of the call.
SLOW_CALL_S = 0.02


def _timed_calls(fn: Callable[[], Any], device: torch.device, count: int) -> list[float]:
    """Seconds of `count` calls, each timed on its own: CUDA events on a GPU, else perf_counter."""
    samples = []
    for _ in range(count):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
        else:
            start_s = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start_s)
    return samples


def measure_time(
    fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 10, warmup: int = 2, slow: bool = False
) -> Timing:
    """Median, min and max seconds of fn() over `repeats` runs after `warmup` runs.

    GPU, `slow=False`: one untimed call and one timed probe; an op under SLOW_CALL_S then goes
    through triton's do_bench (CUDA events, L2 flushed before each run, `warmup` not used), topped
    up with plain event timings to `repeats` samples; a slower one gets `repeats` event timings.
    GPU, `slow=True` (see `time_slow`) and CPU: `warmup` untimed calls, then `repeats` timed ones."""
    device = torch.device(device)
    if device.type == "cuda" and not slow:
        # The first call pays lazy loading, Triton compilation and autotuning; the second says
        # whether the op is slow. do_bench spends 5 calls estimating an op and at least 2 more
        # warming up before its first sample, for a 100 ms op ~1 s of nothing measured; an op
        # of SLOW_CALL_S or more is timed as `time_slow` does (the probe is its first sample).
        fn()
        (probe_s,) = _timed_calls(fn, device, 1)
        if probe_s >= SLOW_CALL_S:
            return Timing.of([probe_s] + _timed_calls(fn, device, max(1, repeats) - 1))
        from triton.testing import do_bench

        # warmup/rep are milliseconds; return_mode="all" returns every sample (ms). A slow op
        # gets few samples in 100 ms, hence the top-up.
        samples = [t / 1e3 for t in do_bench(fn, warmup=25, rep=100, return_mode="all")]
        samples += _timed_calls(fn, device, repeats - len(samples))
        return Timing.of(samples)
    for _ in range(warmup):
        fn()
    return Timing.of(_timed_calls(fn, device, max(1, repeats)))


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device | str, repeats: dict[str, int], *, warmup: int = 1
) -> dict[str, Timing]:
    """`measure_time` for several paths at once, their timed calls interleaved: every path is
    warmed up, then the calls go round-robin, a path with fewer repeats spread evenly over the
    rounds. On a shared machine a slow period then lands on every path instead of on whichever
    happened to be running, so the ratio of medians is stable. Each call is timed on its own
    (CUDA events on a GPU, perf_counter otherwise)."""
    device = torch.device(device)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    rounds = max(repeats.values())
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(rounds):
        for name, fn in fns.items():
            # Path `name` runs in the rounds where its share of the calls crosses an integer.
            wanted = max(1, repeats[name])
            if (round_index + 1) * wanted // rounds > round_index * wanted // rounds:
                samples[name] += _timed_calls(fn, device, 1)
    return {name: Timing.of(values) for name, values in samples.items()}


def time_slow(fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 3, warmup: int = 1) -> Timing:
    """`measure_time` for operations of tens of milliseconds or more: on a GPU, CUDA events around
    each call and no L2 flush (at these durations the cache state does not matter, and do_bench
    would run a one-second op 8+ times)."""
    return measure_time(fn, device, repeats=repeats, warmup=warmup, slow=True)


# ---- peak memory ----------------------------------------------------------------------------

CPU_PEAK_METHODS = ("profiler", "rss")


class PeakMemory:
    """Peak memory of one device.

    * `read_and_reset()`: the peak since the previous read (GPU: the caching allocator's peak,
      weights included; CPU: the process's peak resident set). What bench_e2e marks per stage.
    * `extra_during(fn, cpu=...)`: the peak bytes one fn() call holds beyond what was held before
      it, its result kept alive to the end of the call (so outputs count). GPU: the allocator's
      peak minus the bytes allocated before. CPU, `cpu="profiler"`: torch.profiler's memory
      timeline (c10 allocations; workspaces a library allocates itself, e.g. MKL's FFT buffers,
      are not seen; tens of seconds for a large op on 2 cores); `cpu="rss"`: peak RSS minus the
      RSS before (includes memory the allocator keeps; cheap).

    None wherever the platform gives no way to see it."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.kind = self.kind_of(self.device)
        self.available = self.device.type == "cuda" or self._cpu_reset()

    @staticmethod
    def kind_of(device: torch.device | str) -> str:
        return "cuda_max_allocated" if torch.device(device).type == "cuda" else "cpu_peak_rss"

    @staticmethod
    def _cpu_reset() -> bool:
        """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _cpu_status(key: str) -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
        except OSError:
            return None
        return None

    def read_and_reset(self) -> int | None:
        if not self.available:
            return None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return int(peak)
        peak = self._cpu_status("VmHWM")
        self._cpu_reset()
        return peak

    def extra_during(self, fn: Callable[[], Any], *, cpu: str = "rss") -> int | None:
        if self.device.type == "cuda":
            return self._cuda_extra(fn)
        if cpu == "profiler":
            return self._profiler_extra(fn)
        if cpu != "rss":
            raise ValueError(f"cpu={cpu!r}: one of {CPU_PEAK_METHODS}")
        return self._rss_extra(fn)

    def _cuda_extra(self, fn: Callable[[], Any]) -> int:
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        out = fn()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        del out
        return int(peak)

    def _rss_extra(self, fn: Callable[[], Any]) -> int | None:
        if not self.available:
            return None
        gc.collect()
        _release_freed_heap()
        before = self._cpu_status("VmRSS")
        self._cpu_reset()
        out = fn()
        peak = self._cpu_status("VmHWM")
        del out
        if before is None or peak is None:
            return None
        return max(0, peak - before)

    @staticmethod
    def _profiler_extra(fn: Callable[[], Any]) -> int | None:
        try:
            from torch.profiler import ProfilerActivity, profile
            from torch.profiler._memory_profiler import Action
        except ImportError:
            return None
        try:
            with profile(
                activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
            ) as prof:
                out = fn()
            timeline = prof._memory_profile().timeline
        except Exception:  # the memory timeline is a private profiler API; never fail a bench on it
            return None
        del out
        live = peak = 0
        for _, action, _, size in timeline:
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return int(peak)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str, *, cpu: str = "profiler") -> int | None:
    """Peak bytes one fn() call allocates beyond what was live before it (`PeakMemory.extra_during`;
    on a CPU through the profiler's timeline unless `cpu="rss"`)."""
    return PeakMemory(device).extra_during(fn, cpu=cpu)


def _release_freed_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (no-op where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def free_device_memory(device: torch.device | str) -> None:
    """Collect garbage and give the caching allocator's free blocks back (GPU)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ---- floors ---------------------------------------------------------------------------------


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure_time(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    return 2.0 * src.numel() * 4 / timing.median_s


def matmul_rate(device: torch.device | str, dtype: torch.dtype, *, n: int | None = None) -> float:
    """Measured dense matmul rate in FLOP/s for `dtype` on `device`: the compute floor's divisor.

    A square n^3 product large enough to reach the device's peak (default n = 8192 on a GPU:
    1.1 TFLOP, ~1.4 ms on an H100; n = 1024 on a CPU, ~2 GFLOP)."""
    device = torch.device(device)
    if n is None:
        n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = measure_time(lambda: torch.mm(a, b, out=out), device, repeats=10, warmup=2)
    return 2.0 * n**3 / timing.median_s


# ---- run facts: versions, commit, device, NVML ----------------------------------------------


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def nvml_snapshot(device: torch.device | str) -> dict[str, Any] | None:
    """Driver, name, clocks, power, memory and temperature of the GPU behind `device`, from NVML
    (nvidia-ml-py).

    None for a CPU device, without the package or when NVML cannot start (pynvml.NVMLError, e.g.
    no driver or no GPU); a field the driver does not report is None."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        handle = _nvml_handle(pynvml, device)

        def read(fn, *args, scale=1.0):
            try:
                value = fn(handle, *args)
            except pynvml.NVMLError:
                return None
            if isinstance(value, bytes):
                return value.decode()
            return value * scale if scale != 1.0 else value

        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
            driver = driver.decode() if isinstance(driver, bytes) else str(driver)
        except pynvml.NVMLError:
            driver = None
        memory = read(pynvml.nvmlDeviceGetMemoryInfo)
        return {
            "name": read(pynvml.nvmlDeviceGetName),
            "driver": driver,
            "sm_clock_mhz": read(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_SM),
            "mem_clock_mhz": read(pynvml.nvmlDeviceGetClockInfo, pynvml.NVML_CLOCK_MEM),
            "max_sm_clock_mhz": read(pynvml.nvmlDeviceGetMaxClockInfo, pynvml.NVML_CLOCK_SM),
            "power_w": read(pynvml.nvmlDeviceGetPowerUsage, scale=1e-3),  # NVML reports milliwatts
            "power_limit_w": read(pynvml.nvmlDeviceGetEnforcedPowerLimit, scale=1e-3),
            "temperature_c": read(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU),
            "memory_used_bytes": None if memory is None else int(memory.used),
            "memory_total_bytes": None if memory is None else int(memory.total),
        }
    except pynvml.NVMLError:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _nvml_handle(pynvml, device: torch.device):
    """The NVML handle of torch's device (by PCI bus id, which survives CUDA_VISIBLE_DEVICES)."""
    index = device.index if device.index is not None else 0
    try:
        if device.index is None:
            index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
    except (RuntimeError, AssertionError):  # torch without CUDA: fall back to NVML's numbering
        props = None
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        try:
            domain = getattr(props, "pci_domain_id", 0)
            dev = getattr(props, "pci_device_id", 0)
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout this file lives in (with '-dirty' when tracked files changed), else
    $HIFLOW_GIT_COMMIT (a copy of the tree without .git, e.g. on the GPU machine)."""
    root = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("HIFLOW_GIT_COMMIT")
    return commit + ("-dirty" if dirty else "")


# ---- CPU allocator --------------------------------------------------------------------------

CPU_ALLOCATORS = ("retain", "system")
# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Blocks up to this size come from the heap (which is then never trimmed) instead of mmap.
# glibc refuses thresholds above its own limit on some versions; 32 MiB (its documented
# maximum on 64-bit) is the fallback, enough for every latent of a 4K step.
_MMAP_THRESHOLDS = (1 << 30, 32 << 20)
_cpu_allocator_state: str | None = None


def retain_freed_memory() -> str:
    """Make glibc keep the memory a process frees instead of returning it to the kernel.

    glibc gives big blocks back at once (mmap'ed ones on free, the heap top once its free tail
    passes the trim threshold), so a call that allocates large tensors may pay the kernel for
    new zeroed pages (~0.25 ms per MiB on the 2-core VMs this project measures on), by an amount
    set by the heap's history more than by the code being timed: 0 to 150 MiB of faults per
    call for the same 4K guidance step in different process histories. PyTorch's CPU tuning
    guides reach the same end with jemalloc or tcmalloc; a GPU benchmark never sees it (the
    caching allocator). Applies to the whole process, every path
    alike, and cannot be undone; only the benchmark CLIs call it. Returns the state for the
    records: "retain", or "system (...)" where glibc's mallopt is not there."""
    global _cpu_allocator_state
    if _cpu_allocator_state is not None:
        return _cpu_allocator_state
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        _cpu_allocator_state = "system (no glibc mallopt)"
        return _cpu_allocator_state
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    trimmed = mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    mapped = any(mallopt(_M_MMAP_THRESHOLD, size) == 1 for size in _MMAP_THRESHOLDS)
    _cpu_allocator_state = "retain" if trimmed and mapped else "system (mallopt refused)"
    return _cpu_allocator_state


def apply_cpu_allocator(choice: str) -> str:
    """`--cpu-allocator`: "retain" applies `retain_freed_memory`; "system" changes nothing (and
    says so when an earlier call in this process already retained)."""
    if choice == "retain":
        return retain_freed_memory()
    return "retain (set earlier in this process)" if _cpu_allocator_state == "retain" else "system"


def run_environment(device: torch.device | str) -> dict[str, Any]:
    """Versions, commit, device name and NVML snapshot of this run (stored in every record)."""
    device = torch.device(device)
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _package_version("triton"),
            "cuda": torch.version.cuda,
            "diffusers": _package_version("diffusers"),
        },
        "commit": git_commit(),
        "device_name": device_name(device),
        "nvml": nvml_snapshot(device),
    }


def device_heading(environment: dict[str, Any], device: torch.device | str) -> str:
    """What every table says about where it was measured; CPU numbers say so loudly."""
    name = environment.get("device_name")
    if torch.device(device).type == "cpu":
        allocator = environment.get("cpu_allocator")
        memory = f", allocator {allocator}" if allocator else ""
        return f"CPU: {name}{memory} -- CPU timings of reduced models, not GPU results"
    return f"GPU: {name}"


# ---- records --------------------------------------------------------------------------------


def make_record(
    name: str,
    device: torch.device | str,
    path: str,
    timing: Timing | None,
    peak_bytes: int | None,
    environment: dict[str, Any],
    *,
    latent_hw: tuple[int, int] | None = None,
    floor_s: float | None = None,
    skipped: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One measured case in the suite's vocabulary.

    `timing` None: nothing was timed (median_s/min_s/max_s null, repeats 0; give `skipped` with
    the reason when the case could not run). `floor_s`: adds `fraction_of_floor` = floor_s /
    median_s. `label` (what a plot calls the case) defaults to the latent grid "HxW"."""
    record: dict[str, Any] = {"name": name, "device": torch.device(device).type}
    if latent_hw is not None:
        record["latent_hw"] = list(latent_hw)
    record["path"] = path
    if timing is None:
        record.update(median_s=None, min_s=None, max_s=None, repeats=0)
    else:
        record.update(median_s=timing.median_s, min_s=timing.min_s, max_s=timing.max_s, repeats=timing.repeats)
    record["peak_bytes"] = peak_bytes
    if floor_s is not None:
        median = record["median_s"]
        record["floor_s"] = floor_s
        record["fraction_of_floor"] = floor_s / median if median and math.isfinite(median) else None
    if skipped is not None:
        record["skipped"] = skipped
    record.update(extra)
    if "label" not in record and latent_hw is not None:
        record["label"] = "x".join(str(v) for v in latent_hw)
    record.update(environment)
    return record


# A case that raised has a `skipped` reason starting with this; an out-of-memory case does not (a
# size that does not fit the device is a result, not a failure).
FAILED_PREFIX = "failed: "


def case_skip_reason(exc: BaseException) -> str:
    """The `skipped` reason of a case that raised, so that a benchmark records it and goes on to
    its next case: out of memory (a size that does not fit), or a failure (a backend refusing its
    inputs, a kernel that does not compile, ...), whose traceback goes to stderr, i.e. into the
    run's log. Bad input (HiFlowInputError) and anything that is not an Exception propagate."""
    if isinstance(exc, HiFlowInputError) or not isinstance(exc, Exception):
        raise exc
    message = (str(exc).strip().splitlines() or [""])[0]
    if is_out_of_memory(exc):
        return f"out of memory: {message}" if message else "out of memory"
    traceback.print_exception(exc, file=sys.stderr)
    return f"{FAILED_PREFIX}{type(exc).__name__}" + (f": {message}" if message else "")


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """A markdown table of `rows`, columns given as (header, key)."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for _, key in columns:
            value = row.get(key)
            if isinstance(value, float):
                cells.append(f"{value:.4g}")
            elif value is None:
                cells.append("-")
            else:
                cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- outputs --------------------------------------------------------------------------------


class Outputs:
    """Where a benchmark's results go: a JSON list of records, a markdown file, a PNG plot.

    Made before anything is measured: an existing output without `overwrite` is a
    HiFlowInputError then (and `atomic_write` refuses again at write time, should one appear
    meanwhile). `add` appends records and rewrites the JSON at once, so the cases measured so far
    survive a run that is stopped part way (bench/gpu_check's step timeouts); `finish` writes the
    final JSON, the markdown and the plot. Every file goes through hiflow_fast.io.atomic_write."""

    def __init__(
        self,
        json_path: Path | None = None,
        markdown_path: Path | None = None,
        plot_path: Path | None = None,
        *,
        overwrite: bool = False,
    ):
        self.json_path, self.markdown_path, self.plot_path = json_path, markdown_path, plot_path
        self.overwrite = overwrite
        self.records: list[dict[str, Any]] = []
        self._written: set[Path] = set()
        for path in (json_path, markdown_path, plot_path):
            if path is not None and path.exists() and not overwrite:
                raise HiFlowInputError("output", str(path), "a path that does not exist yet (pass --overwrite to replace it)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Outputs":
        return cls(args.json, args.markdown, getattr(args, "plot", None), overwrite=args.overwrite)

    def _write(self, path: Path, write: Callable[[str], None]) -> None:
        from hiflow_fast.io import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        # A file this run wrote itself (a partial JSON) is replaced; anything else only with --overwrite.
        atomic_write(path, write, overwrite=self.overwrite or path in self._written)
        self._written.add(path)

    def _write_json(self) -> None:
        text = json.dumps(self.records, indent=2, default=str) + "\n"
        self._write(self.json_path, lambda tmp: Path(tmp).write_text(text))

    def add(self, records: list[dict[str, Any]]) -> None:
        """Append `records` and rewrite the JSON (also with no records: after a change to records
        already added, e.g. a ratio that needed the case measured after them)."""
        self.records += records
        if self.json_path is not None:
            self._write_json()

    @property
    def exit_status(self) -> int:
        """1 when a case failed (its record's `skipped` says why), else 0."""
        return int(any(str(r.get("skipped") or "").startswith(FAILED_PREFIX) for r in self.records))

    def finish(self, markdown: str, *, title: str) -> None:
        if self.json_path is not None:
            self._write_json()
            print(f"wrote {len(self.records)} records to {self.json_path}")
        if self.markdown_path is not None:
            self._write(self.markdown_path, lambda tmp: Path(tmp).write_text(markdown))
            print(f"wrote {self.markdown_path}")
        if self.plot_path is not None:
            from hiflow_fast.bench.plot import plot_records

            self.plot_path.parent.mkdir(parents=True, exist_ok=True)
            plot_records(self.records, self.plot_path, title=title, overwrite=self.overwrite)
            print(f"wrote {self.plot_path}")


# ---- command line ---------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser, *, threads: bool = False) -> None:
    """--device and the outputs (--json, --markdown, --plot, --overwrite); --threads if asked."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) to this file")
    parser.add_argument("--markdown", type=Path, help="write the tables to this markdown file")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of the records (needs matplotlib)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATORS, default="retain",
                        help="CPU runs: 'retain' (default) keeps freed memory in the process so that no path "
                             "is timed paying for fresh pages, as a GPU's caching allocator does; 'system' "
                             "leaves glibc's default (timings then include page faults)")
    if threads:
        parser.add_argument("--threads", type=int, default=None,
                            help="CPU threads (torch.set_num_threads; default: torch's). On a CPU shared with "
                                 "other jobs, 1 avoids the stalls of a 2-thread pool whose second core is busy")


def at_least(option: str, value: int | None, minimum: int) -> None:
    """A HiFlowInputError unless `value` (when given) is an integer >= `minimum`."""
    if value is not None and value < minimum:
        raise HiFlowInputError(option, value, f"an integer >= {minimum}")


def start(args: argparse.Namespace) -> tuple[torch.device, Outputs, dict[str, Any]]:
    """Check what every benchmark checks before measuring (the device exists, --threads, the
    outputs do not exist yet), then give the device, the outputs and the run's facts
    (`run_environment`)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HiFlowInputError("--device", "cuda", "cpu: no CUDA device is available here")
    threads = getattr(args, "threads", None)
    at_least("--threads", threads, 1)
    outputs = Outputs.from_args(args)
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    environment = run_environment(device)
    if device.type == "cpu":
        environment["cpu_allocator"] = apply_cpu_allocator(getattr(args, "cpu_allocator", "system"))
    return device, outputs, environment


def comma_list(option: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    """The items of a comma list, each one of `allowed` (else a HiFlowInputError)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    for item in items:
        if item not in allowed:
            raise HiFlowInputError(option, item, f"one of {', '.join(allowed)}")
    return items


def run_cli(main_fn: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a benchmark main with bad input reported as one `error: ...` line and status 2."""
    try:
        return main_fn(argv)
    except HiFlowInputError as exc:
        from hiflow_fast.parallel import is_main_process

        if is_main_process():  # under torchrun every rank refuses the same arguments
            print(f"error: {exc}", file=sys.stderr)
        return 2


def bench_main(main_fn: Callable[[list[str] | None], int]) -> Callable[..., int]:
    """A benchmark's `main(argv=None) -> int` (what `hiflow-fast bench NAME` calls): `main_fn`
    through `run_cli`."""

    def main(argv: list[str] | None = None) -> int:
        return run_cli(main_fn, argv)

    main.__doc__ = main_fn.__doc__
    return main
