"""The whole benchmark suite in one run: guidance, transformer, vae, e2e.

    hiflow-fast bench all --device cpu --json all.json --markdown all.md [--plot all.png]
    hiflow-fast bench all --device cuda --quick --json $OUT/bench.json     # what bench/gpu_check runs
    hiflow-fast bench all --only vae,e2e --e2e-args="--plans 2k"

Each sub-benchmark (`bench_<name>.main`) runs in this process, in turn, with the arguments that
size it for the device (`SUITE`: reduced models and small sizes on a CPU, full FLUX shapes on a
GPU; `--quick` trims the GPU run to the time bench/gpu_check allows), writing its JSON and
markdown to a temporary folder; the records are merged into one JSON list and the tables into
one markdown file. A sub-benchmark that fails or is not there yet is reported and the others go
on (exit status 1 if any failed). Outputs are written atomically and never replace an existing
file without --overwrite.

The second half of this module holds the small measuring helpers that bench_e2e and bench_vae
share (NVML snapshot, matmul rate, slow-op timing, output writing). They complement
hiflow_fast.bench.common (owned by the harness) and belong there once it is settled.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from hiflow_fast.errors import HiFlowInputError

# ---- the suite ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteEntry:
    """How the suite runs one benchmark: its arguments per device and for smoke tests."""

    name: str
    cpu: tuple[str, ...] = ()  # reduced sizes: the whole CPU suite stays under ~3 minutes on 2 cores
    cuda: tuple[str, ...] = ()  # full FLUX shapes
    cuda_quick: tuple[str, ...] | None = None  # the gpu_check budget (None: as `cuda`)
    smoke: tuple[str, ...] = ()  # the smallest sizes, seconds on a CPU (tests/test_bench_smoke.py)
    notes: str = ""


SUITE: dict[str, SuiteEntry] = {
    entry.name: entry
    for entry in (
        SuiteEntry(
            "guidance",
            # A 512 px latent (64^2): on a CPU, peak memory goes through torch.profiler's memory
            # timeline, which needs ~60 s for the official mask loop at 128^2 alone; the fused
            # path would run through Triton's interpreter (a correctness path, not a timing).
            cpu=("--sizes", "64", "--paths", "official,ref", "--repeats", "3"),
            cuda=("--sizes", "1k,2k,4k"),
            smoke=("--sizes", "32", "--paths", "official,ref", "--repeats", "1"),
        ),
        SuiteEntry(
            "transformer",
            # --quick: 4 heads x 32, 64 text tokens, 256/1024 image tokens (the benchmark's CPU size).
            cpu=("--quick", "--repeats", "3"),
            cuda=(),
            cuda_quick=("--sizes", "1k,4k", "--repeats", "5"),
            smoke=("--quick", "--sizes", "256", "--repeats", "1", "--no-attention"),
        ),
        SuiteEntry(
            "vae",
            cpu=("--model", "reduced", "--sizes", "256", "--repeats", "3"),
            cuda=("--model", "full", "--sizes", "2k,4k", "--repeats", "3"),
            cuda_quick=("--model", "full", "--sizes", "4k", "--repeats", "2"),
            smoke=("--model", "tiny", "--sizes", "128", "--repeats", "1", "--warmup", "0"),
        ),
        SuiteEntry(
            "e2e",
            cpu=("--model", "reduced", "--plans", "cpu", "--repeats", "3"),
            cuda=("--model", "full", "--plans", "official,2k", "--repeats", "1"),
            # Full-size plans, 2 timed steps per stage, stage time = entry + planned steps x the
            # measured per-step time (records say `estimated`); ~1.5 minutes on an H100.
            cuda_quick=("--model", "full", "--plans", "official,2k", "--repeats", "1", "--sample-steps", "2"),
            smoke=("--model", "tiny", "--plans", "tiny", "--repeats", "1", "--warmup", "0"),
        ),
    )
}


def suite_args(name: str, device: str, *, quick: bool = False, smoke: bool = False) -> list[str]:
    """The arguments `bench all` gives benchmark `name` on `device` (no --device/--json/...)."""
    entry = SUITE.get(name, SuiteEntry(name))
    if smoke:
        return list(entry.smoke)
    if device == "cuda":
        return list(entry.cuda_quick if quick and entry.cuda_quick is not None else entry.cuda)
    return list(entry.cpu)


def available_benchmarks() -> list[str]:
    """Benchmarks installed here (bench_<name>.py), in suite order, then any others by name."""
    import importlib.resources

    folder = importlib.resources.files("hiflow_fast.bench")
    found = {
        p.name[len("bench_"):-3]
        for p in folder.iterdir()
        if p.name.startswith("bench_") and p.name.endswith(".py") and p.name != "bench_all.py"
    }
    return [n for n in SUITE if n in found] + sorted(found - set(SUITE))


# ---- shared measuring helpers (used by bench_e2e and bench_vae) -------------------------------


@dataclass
class Timing:
    """Seconds of a slow operation over warmed-up repeats (the shape of common.Timing)."""

    median_s: float
    min_s: float
    max_s: float
    repeats: int
    samples: list[float] = field(default_factory=list)


def time_slow(fn: Callable[[], Any], device: torch.device | str, *, repeats: int = 3, warmup: int = 1) -> Timing:
    """Median/min/max seconds of fn() for operations of tens of milliseconds or more.

    GPU: CUDA events around each call (no L2 flush: at these durations the cache state does not
    matter, and triton's do_bench would run a one-second op 8+ times); CPU: perf_counter."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            samples.append(start.elapsed_time(stop) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), min(samples), max(samples), len(samples), samples)


class PeakMemory:
    """Peak memory between two reads. GPU: the caching allocator's peak (weights included).
    CPU (Linux): the process's peak resident set (VmHWM), reset by writing 5 to
    /proc/self/clear_refs -- cheap, unlike the profiler's memory timeline (tens of seconds for
    one VAE decode on 2 cores). None where neither is available."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = self.kind_of(device)
        self.available = device.type == "cuda" or self._cpu_reset()

    @staticmethod
    def kind_of(device: torch.device) -> str:
        return "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    @staticmethod
    def _cpu_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _cpu_status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
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

    def extra_during(self, fn: Callable[[], Any]) -> int | None:
        """Peak bytes one fn() call holds beyond what was held before it (its result kept alive
        to the end of the call, so outputs count). GPU: hiflow_fast.bench.common's allocator
        measure; CPU: peak RSS minus the RSS before (includes memory the allocator keeps)."""
        if self.device.type == "cuda":
            from hiflow_fast.bench.common import peak_extra_bytes

            return peak_extra_bytes(fn, self.device)
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


def _release_freed_heap() -> None:
    """glibc's malloc_trim(0): return free heap pages to the OS (no-op where there is no glibc)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def matmul_rate(device: torch.device | str, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in FLOP/s for `dtype` on `device`: the compute floor's divisor.

    A square n^3 product large enough to reach the device's peak (n = 8192 on a GPU: 1.1 TFLOP,
    ~1.4 ms on an H100) or the CPU's (n = 1024, ~2 GFLOP)."""
    from hiflow_fast.bench.common import measure_time

    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = measure_time(lambda: torch.mm(a, b, out=out), device, repeats=10, warmup=2)
    return 2.0 * n**3 / timing.median_s


def nvml_snapshot(device: torch.device | str) -> dict[str, Any] | None:
    """Name, clocks, power and memory of the GPU behind `device`, from NVML (nvidia-ml-py).

    None without a GPU, without the package or when NVML cannot start (pynvml.NVMLError, e.g.
    no driver). A field the driver does not report is None."""
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
            return value.decode() if isinstance(value, bytes) else (value * scale if scale != 1.0 else value)

        memory = read(pynvml.nvmlDeviceGetMemoryInfo)
        return {
            "name": read(pynvml.nvmlDeviceGetName),
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
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    bus = getattr(props, "pci_bus_id", None)
    if bus is not None:
        try:
            domain = getattr(props, "pci_domain_id", 0)
            dev = getattr(props, "pci_device_id", 0)
            return pynvml.nvmlDeviceGetHandleByPciBusId(f"{domain:08x}:{bus:02x}:{dev:02x}.0")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def device_heading(environment: dict[str, Any], device: torch.device | str) -> str:
    """What every table says about where it was measured; CPU numbers say so loudly."""
    device = torch.device(device)
    name = environment.get("device_name")
    if device.type == "cpu":
        return f"CPU: {name} -- CPU timings of reduced models, not GPU results"
    return f"GPU: {name}"


def check_outputs(paths: list[Path | None], overwrite: bool) -> None:
    """Fail before any measuring when an output exists (and --overwrite is not given)."""
    for path in paths:
        if path is not None and path.exists() and not overwrite:
            raise HiFlowInputError("output", str(path), "a path that does not exist yet (pass --overwrite to replace it)")


def write_outputs(
    records: list[dict[str, Any]],
    markdown: str,
    *,
    json_path: Path | None,
    markdown_path: Path | None,
    plot_path: Path | None,
    overwrite: bool,
    title: str,
) -> None:
    """Write the JSON list, the markdown and the plot, each atomically (hiflow_fast.io)."""
    from hiflow_fast.io import atomic_write

    for path in (json_path, markdown_path, plot_path):
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    if json_path is not None:
        text = json.dumps(records, indent=2, default=str) + "\n"
        atomic_write(json_path, lambda tmp: Path(tmp).write_text(text), overwrite=overwrite)
        print(f"wrote {len(records)} records to {json_path}")
    if markdown_path is not None:
        atomic_write(markdown_path, lambda tmp: Path(tmp).write_text(markdown), overwrite=overwrite)
        print(f"wrote {markdown_path}")
    if plot_path is not None:
        from hiflow_fast.bench.plot import plot_records

        plot_records(records, plot_path, title=title, overwrite=overwrite)
        print(f"wrote {plot_path}")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="write the records (a JSON list) to this file")
    parser.add_argument("--markdown", type=Path, help="write the tables to this markdown file")
    parser.add_argument("--plot", type=Path, help="write a PNG plot of the records (needs matplotlib)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")


def free_device_memory(device: torch.device | str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_cli(main_fn: Callable[[list[str] | None], int], argv: list[str] | None) -> int:
    """Run a benchmark main with bad input reported as one `error: ...` line and status 2."""
    try:
        return main_fn(argv)
    except HiFlowInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ---- merging --------------------------------------------------------------------------------


def normalise_record(record: dict[str, Any]) -> dict[str, Any]:
    """Give every record the suite's common keys: `fraction_of_floor` (bench_guidance writes it
    as `floor_fraction`, bench_transformer as `fraction_of_matmul`) and `label` (what a plot
    calls the row)."""
    record = dict(record)
    if "fraction_of_floor" not in record and "floor_fraction" in record:
        record["fraction_of_floor"] = record["floor_fraction"]
    # bench_transformer: achieved FLOP/s over the matmul rate = (FLOPs / rate) / time, the same ratio.
    if "fraction_of_floor" not in record and "fraction_of_matmul" in record:
        record["fraction_of_floor"] = record["fraction_of_matmul"]
        if "floor_s" not in record and record.get("flops") and record.get("matmul_flops_per_s"):
            record["floor_s"] = record["flops"] / record["matmul_flops_per_s"]
    if "label" not in record:
        if record.get("latent_hw") is not None:
            record["label"] = "x".join(str(v) for v in record["latent_hw"])
        else:
            record["label"] = str(record.get("stage") or record.get("shape") or "")
    return record


def demote_headings(markdown: str) -> str:
    """Nest a sub-benchmark's markdown under this report: every heading one level deeper."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


# ---- main -----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    add_output_arguments(parser)
    parser.add_argument("--only", help="comma list of benchmarks to run (default: all installed)")
    parser.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    parser.add_argument("--quick", action="store_true", help="on a GPU: the trimmed sizes bench/gpu_check runs")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds each; for tests)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for every benchmark (torch.set_num_threads; default: torch's). On a "
                             "CPU shared with other jobs, 1 avoids the stalls of a 2-thread pool whose second "
                             "core is busy elsewhere")
    for name in SUITE:
        parser.add_argument(f"--{name}-args", default="", help=f"extra arguments for bench {name} (one quoted string)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise HiFlowInputError("--device", "cuda", "cpu: no CUDA device is available here")
    check_outputs([args.json, args.markdown, args.plot], args.overwrite)
    if args.threads is not None:
        if args.threads < 1:
            raise HiFlowInputError("--threads", args.threads, "an integer >= 1")
        torch.set_num_threads(args.threads)
    installed = available_benchmarks()
    names = installed if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    for name in list(names) + sorted(skip):
        if name not in installed and name not in SUITE:
            raise HiFlowInputError("--only/--skip", name, f"one of the benchmarks: {', '.join(installed)}")
    names = [n for n in names if n not in skip]

    from hiflow_fast.bench.common import run_environment

    environment = run_environment(args.device)
    heading = device_heading(environment, args.device)
    print(f"bench all on {heading}")
    records: list[dict[str, Any]] = []
    sections: list[str] = []
    failed: list[str] = []
    wall: dict[str, float] = {}
    suite_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hiflow-bench-") as tmp:
        for name in names:
            if name not in installed:
                print(f"\n== {name}: not installed yet (bench/bench_{name}.py is missing); skipped")
                sections.append(f"## {name}\n\nNot run: bench/bench_{name}.py is not there yet.\n")
                continue
            sub_args = suite_args(name, args.device, quick=args.quick, smoke=args.smoke)
            sub_args += shlex.split(getattr(args, f"{name.replace('-', '_')}_args", "") or "")
            json_path, md_path = Path(tmp) / f"{name}.json", Path(tmp) / f"{name}.md"
            argv_sub = ["--device", args.device, *sub_args, "--json", str(json_path), "--markdown", str(md_path)]
            print(f"\n== {name}: hiflow-fast bench {name} {' '.join(shlex.quote(a) for a in argv_sub)}")
            start = time.perf_counter()
            try:
                module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
                status = int(module.main(argv_sub) or 0)
            except Exception:  # one broken benchmark must not hide the others' results
                traceback.print_exc()
                status = 1
            except SystemExit as exc:  # argparse errors of a sub-benchmark
                status = exc.code if isinstance(exc.code, int) else 1
            wall[name] = time.perf_counter() - start
            free_device_memory(args.device)
            if status != 0:
                failed.append(name)
                sections.append(f"## {name}\n\nFailed (exit status {status}); see the log.\n")
            if json_path.exists():
                records += [normalise_record(r) for r in json.loads(json_path.read_text())]
            if md_path.exists():
                text = md_path.read_text().strip()
                sections.append(demote_headings(text) if text.startswith("#") else f"## {name}\n\n{text}")
                sections.append("")
            print(f"== {name}: {wall[name]:.1f} s")
    total = time.perf_counter() - suite_start
    summary = ", ".join(f"{n} {s:.0f} s" for n, s in wall.items())
    markdown = "\n".join(
        [
            "# hiflow_fast benchmarks",
            "",
            f"Device: {heading}. Commit {environment.get('commit')}, torch {environment['versions'].get('torch')}, "
            f"diffusers {environment['versions'].get('diffusers')}, triton {environment['versions'].get('triton')}.",
            f"Suite wall time {total:.0f} s ({summary}).",
            "",
            *sections,
        ]
    )
    write_outputs(
        records, markdown, json_path=args.json, markdown_path=args.markdown, plot_path=args.plot,
        overwrite=args.overwrite, title=f"hiflow_fast benchmarks -- {heading}",
    )
    print(f"\nsuite wall time {total:.1f} s ({summary})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
