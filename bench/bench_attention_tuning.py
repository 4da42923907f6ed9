"""First-call cost of our attention at 66k tokens: compile + autotune, then the on-disk caches.

    hiflow-fast bench attention_tuning --device cuda --json tuning.json

Each phase is a fresh Python process (nothing in memory) that times its first
hiflow_fast::flash_attention call at Flux's 4K shape (bf16, 24 heads x 128, 512 + 65,536
tokens: compile, autotune of the configs that fit this GPU, run) and then a second call (the
run alone). Phase `first` uses Triton's cache as the machine has it (in bench/gpu_check, after
the GPU tests and the transformer benchmark, which may have tuned the same key already); phase
`warm` comes after it, so its compiled kernels and autotune timings are on disk: the goal is a
warm first call <= 5 s. Records say how many autotune result files the cache held before each
phase. Seconds of wall time (CUDA synchronised), median of one: a cost paid once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from hiflow_fast.bench.common import Timing, add_common_arguments, bench_main, device_heading, make_record, markdown_table, start

BENCH_NAME = "attention_tuning"
TOKENS = 512 + 65_536
HEADS = 24
HEAD_DIM = 128

# Run in a fresh interpreter: prints one JSON line.
PHASE_SCRIPT = f"""
import json, time, torch
from hiflow_fast.ops.flash_attention import flash_attention
from hiflow_fast.kernels import flash_attention as fa
q, k, v = (torch.randn(1, {TOKENS}, {HEADS}, {HEAD_DIM}, device="cuda", dtype=torch.bfloat16) for _ in range(3))
torch.cuda.synchronize()
t0 = time.perf_counter(); flash_attention(q, k, v); torch.cuda.synchronize(); t1 = time.perf_counter()
flash_attention(q, k, v); torch.cuda.synchronize(); t2 = time.perf_counter()
tuner = fa.flash_attention_kernel_autotuned
best = getattr(tuner, "best_config", None)
print(json.dumps({{"first_call_s": t1 - t0, "second_call_s": t2 - t1, "best_config": str(best),
                  "bench_time_s": getattr(tuner, "bench_time", None)}}))
"""


def autotune_files() -> int:
    """Autotune result files in Triton's cache dir (its cache_results=True entries)."""
    root = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")
    return sum(1 for _ in root.glob("*/*.autotune.json")) if root.exists() else 0


def run_phase(timeout_s: float) -> dict:
    done = subprocess.run([sys.executable, "-P", "-c", PHASE_SCRIPT], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"phase process failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench attention_tuning", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--phase-timeout", type=float, default=120.0, help="seconds allowed per phase process")
    return parser.parse_args(argv)


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    device, outputs, environment = start(args)
    print(f"bench attention_tuning on {device_heading(environment, device)}")
    rows = []
    for phase in ("first", "warm"):
        case = dict(phase=phase, tokens=TOKENS, heads=HEADS, head_dim=HEAD_DIM, dtype="bfloat16",
                    autotune_files_before=autotune_files(), label=phase)
        if device.type != "cuda":
            record = make_record(BENCH_NAME, device, "flash_attention", None, None, environment,
                                 skipped="needs a CUDA GPU (compiles and tunes for it)", **case)
        else:
            try:
                result = run_phase(args.phase_timeout)
                timing = Timing.of([result["first_call_s"]])
                record = make_record(BENCH_NAME, device, "flash_attention", timing, None, environment, **case, **result)
                rows.append(dict(case, **result))
                print(f"  {phase}: first call {result['first_call_s']:.2f} s, second {result['second_call_s'] * 1e3:.1f} ms, "
                      f"best {result['best_config']}")
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                record = make_record(BENCH_NAME, device, "flash_attention", None, None, environment,
                                     skipped=f"failed: {exc}", **case)
        outputs.add([record])
    columns = [("phase", "phase"), ("autotune files before", "autotune_files_before"), ("first call s", "first_call_s"),
               ("second call s", "second_call_s"), ("tuning s", "bench_time_s"), ("best config", "best_config")]
    markdown = "\n".join(["# Attention first-call (compile + autotune) cost at 66k tokens", "",
                          device_heading(environment, device), "", markdown_table(rows, columns), ""])
    outputs.finish(markdown, title="attention first-call cost")
    return outputs.exit_status


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
