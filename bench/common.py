"""Shared bench harness: timing, peak extra memory, the bandwidth floor and JSON records.

* Timing: median / min / max over warmed-up repeats. On a GPU, CUDA events through
  `triton.testing.do_bench` (it also flushes L2 between runs); on the CPU, perf_counter.
* Peak extra memory: bytes allocated by one call beyond what was live before it. GPU: the
  caching allocator's peak statistics. CPU: torch.profiler's memory timeline (c10 allocations;
  workspaces a library allocates on its own, e.g. MKL's FFT buffers, are not seen).
* Floor: the time the bytes a step must move take at the *measured* copy bandwidth of this
  device (a device-to-device copy, bytes read + written), so a result reads as a fraction of it.
* Records: one JSON object per (bench, device, shape, path) with name, device, latent_hw, path,
  median_s, min_s, max_s, peak_bytes, and the run's versions, git commit and device name.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_time(fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 10, warmup: int = 2) -> Timing:
    """Median, min and max seconds of fn() over `repeats` runs after `warmup` runs."""
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench: CUDA events, L2 flushed before each run; warmup/rep are milliseconds and
        # return_mode="all" returns every sample (ms). A slow path gets few samples in 100 ms,
        # so top up with plain event timings.
        samples = [t / 1e3 for t in do_bench(fn, warmup=25, rep=100, return_mode="all")]
        while len(samples) < repeats:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
    else:
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples))


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak bytes allocated during one fn() call beyond the bytes live before it (None if the
    platform gives no way to see it). The result of fn is kept alive until the end of the call,
    so outputs count too."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return int(peak)
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


def copy_bandwidth(device: torch.device | str, nbytes: int = 256 * 2**20) -> float:
    """Measured copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 64 * 2**20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    timing = measure_time(lambda: dst.copy_(src), device, repeats=10, warmup=2)
    return 2.0 * src.numel() * 4 / timing.median_s


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


def nvml_info() -> dict[str, Any] | None:
    """Driver version and clocks from NVML (nvidia-ml-py), or None without a GPU / the package."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            return {
                "driver": _as_str(pynvml.nvmlSystemGetDriverVersion()),
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
                "temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD of the checkout this file lives in (with '-dirty' when tracked files changed)."""
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


def run_environment(device: torch.device | str) -> dict[str, Any]:
    """Versions, commit and device of this run (stored in every record)."""
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
        "nvml": nvml_info() if device.type == "cuda" else None,
    }


def make_record(
    name: str,
    device: torch.device | str,
    latent_hw: tuple[int, int],
    path: str,
    timing: Timing,
    peak_bytes: int | None,
    environment: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    record = {
        "name": name,
        "device": torch.device(device).type,
        "latent_hw": list(latent_hw),
        "path": path,
        "median_s": timing.median_s,
        "min_s": timing.min_s,
        "max_s": timing.max_s,
        "repeats": timing.repeats,
        "peak_bytes": peak_bytes,
    }
    record.update(extra)
    record.update(environment)
    return record


def write_json(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2) + "\n")


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
