"""The whole benchmark suite in one run: guidance, transformer, vae, e2e.

    hiflow-fast bench all --device cpu --json all.json --markdown all.md [--plot all.png]
    hiflow-fast bench all --device cuda --quick --only vae --keep-parts DIR  # a bench/gpu_check step
    hiflow-fast bench all --only vae,e2e --e2e-args="--plans 2k"

Each sub-benchmark (`bench_<name>.main`) runs in this process, in turn, with the arguments that
size it for the device (`SUITE`: reduced models and small sizes on a CPU, full FLUX shapes on a
GPU; `--quick` trims the GPU run to the time bench/gpu_check allows), writing its JSON and
markdown to a temporary folder (or to --keep-parts DIR, where a sub-benchmark's JSON grows case by
case, so a run stopped part way still leaves what it measured); the records, all in the one
vocabulary of bench/common.py, are merged into one JSON list and the tables into one markdown
file. A sub-benchmark that fails or is not there yet is reported and the others go on (exit
status 1 if any failed). Outputs are written atomically and never replace an existing file
without --overwrite (checked before anything runs).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import shlex
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from hiflow_fast.bench.common import (
    Outputs,
    add_common_arguments,
    bench_main,
    device_heading,
    free_device_memory,
    start,
)
from hiflow_fast.errors import HiFlowInputError

# ---- the suite ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteEntry:
    """How the suite runs one benchmark: its arguments per device and for smoke tests."""

    name: str
    cpu: tuple[str, ...] = ()  # reduced sizes: the whole CPU suite stays under ~3 minutes on 2 cores
    cuda: tuple[str, ...] = ()  # full FLUX shapes
    # what bench/gpu_check runs, each within its step's budget (the table atop gpu_check; None: as `cuda`)
    cuda_quick: tuple[str, ...] | None = None
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
            # The 4K comparison and 1K; the official path (a Python loop over 262,144 pixels at
            # 4K, ~4 s a call on a GPU) runs 1 warm-up + 3 timed calls + 1 for memory.
            cuda_quick=("--sizes", "1k,4k", "--repeats", "3"),
            smoke=("--sizes", "32", "--paths", "official,ref", "--repeats", "1"),
        ),
        SuiteEntry(
            "transformer",
            # --quick: 4 heads x 32, 64 text tokens, 256/1024 image tokens (the benchmark's CPU size).
            cpu=("--quick", "--repeats", "3"),
            cuda=(),
            # The 4K block timings (4 paths, attention backends at 66k tokens) and the 4K
            # peak-memory forward of the whole 19 + 38 block model (stock and fast).
            cuda_quick=("--sizes", "4k", "--repeats", "3", "--full"),
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
            # measured per-step time (records say `estimated`); the 2K plan first, so that its
            # records are written even if the official plan runs out of the step's time.
            cuda_quick=("--model", "full", "--plans", "2k,official", "--repeats", "1", "--sample-steps", "2"),
            smoke=("--model", "tiny", "--plans", "tiny", "--repeats", "1", "--warmup", "0"),
        ),
        SuiteEntry(
            "memory",
            # Counted on fake tensors (no timing): the CPU suite counts small shapes; the official
            # 4K cascade at FLUX.1-dev shapes is `bench memory --device cpu` (minutes on 2 cores).
            cpu=("--model", "tiny", "--cascade", "smoke", "--budgets", "1"),
            # GPU: the 2K and 4K stages at FLUX.1-dev shapes under each budget, sampled steps.
            cuda=("--budgets", "24,16,12,8", "--sample-steps", "2"),
            cuda_quick=("--budgets", "12,8", "--sample-steps", "1", "--gpu-stages", "4k"),
            smoke=("--model", "tiny", "--cascade", "micro", "--budgets", "1"),
        ),
    )
}


# Installed benchmarks that `bench all` runs only when named in --only: the offline compile
# matrix measures no device (it compiles for four GPUs with ptxas, minutes to an hour on a CPU);
# attention_tuning measures first-call compile + autotune on a GPU only (a bench/gpu_check step).
# parallel_model is a model, not a measurement (bench/parallel_model.py): never mixed into a
# suite's measurements unless named.
OPT_IN = frozenset({"compile", "attention_tuning", "parallel_model"})


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


# ---- merging --------------------------------------------------------------------------------


def demote_headings(markdown: str) -> str:
    """Nest a sub-benchmark's markdown under this report: every heading one level deeper."""
    return "\n".join("#" + line if line.startswith("#") else line for line in markdown.splitlines())


# ---- main -----------------------------------------------------------------------------------


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench all", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, threads=True)
    parser.add_argument("--only", help="comma list of benchmarks to run (default: all installed)")
    parser.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    parser.add_argument("--quick", action="store_true", help="on a GPU: the trimmed sizes bench/gpu_check runs")
    parser.add_argument("--smoke", action="store_true", help="the smallest sizes (seconds each; for tests)")
    parser.add_argument("--keep-parts", type=Path, default=None, metavar="DIR",
                        help="write each benchmark's own JSON and markdown to DIR/<name>.json|.md (kept; the "
                             "JSON grows case by case) instead of a temporary folder")
    for name in SUITE:
        parser.add_argument(f"--{name}-args", default="", help=f"extra arguments for bench {name} (one quoted string)")
    return parser.parse_args(argv)


def _select(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(benchmarks installed here, the ones this run asks for)."""
    installed = available_benchmarks()
    names = [n for n in installed if n not in OPT_IN] if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    skip = {n.strip() for n in args.skip.split(",") if n.strip()}
    for name in list(names) + sorted(skip):
        if name not in installed and name not in SUITE:
            raise HiFlowInputError("--only/--skip", name, f"one of the benchmarks: {', '.join(installed)}")
    return installed, [n for n in names if n not in skip]


def _run_one(name: str, argv_sub: list[str]) -> int:
    """bench_<name>.main(argv_sub) -> exit status; a crash is printed, never raised."""
    try:
        module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
        return int(module.main(argv_sub) or 0)
    except Exception:  # one broken benchmark must not hide the others' results
        traceback.print_exc()
        return 1
    except SystemExit as exc:  # argparse errors of a sub-benchmark
        return exc.code if isinstance(exc.code, int) else 1


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    installed, names = _select(args)
    if args.keep_parts is not None:  # the parts are outputs too: refuse before anything runs
        for name in (n for n in names if n in installed):
            Outputs(args.keep_parts / f"{name}.json", args.keep_parts / f"{name}.md", overwrite=args.overwrite)
    device, outputs, environment = start(args)
    if args.keep_parts is not None:
        args.keep_parts.mkdir(parents=True, exist_ok=True)

    heading = device_heading(environment, device)
    print(f"bench all on {heading}")
    sections: list[str] = []
    failed: list[str] = []
    wall: dict[str, float] = {}
    suite_start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        parts = args.keep_parts or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hiflow-bench-")))
        for name in names:
            if name not in installed:
                print(f"\n== {name}: not installed yet (bench/bench_{name}.py is missing); skipped")
                sections.append(f"## {name}\n\nNot run: bench/bench_{name}.py is not there yet.\n")
                continue
            sub_args = suite_args(name, args.device, quick=args.quick, smoke=args.smoke)
            sub_args += shlex.split(getattr(args, f"{name.replace('-', '_')}_args", "") or "")
            json_path, md_path = parts / f"{name}.json", parts / f"{name}.md"
            argv_sub = ["--device", args.device, "--cpu-allocator", args.cpu_allocator, *sub_args,
                        "--json", str(json_path), "--markdown", str(md_path)]
            if args.overwrite and args.keep_parts is not None:
                argv_sub.append("--overwrite")
            print(f"\n== {name}: hiflow-fast bench {name} {' '.join(shlex.quote(a) for a in argv_sub)}")
            sub_start = time.perf_counter()
            status = _run_one(name, argv_sub)
            wall[name] = time.perf_counter() - sub_start
            free_device_memory(device)
            if status != 0:
                failed.append(name)
                sections.append(f"## {name}\n\nFailed (exit status {status}): it stopped, or a case failed "
                                f"(its record's `skipped` says why); see the log.\n")
            if json_path.exists():
                outputs.add(json.loads(json_path.read_text()))
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
    outputs.finish(markdown, title=f"hiflow_fast benchmarks -- {heading}")
    print(f"\nsuite wall time {total:.1f} s ({summary})")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
