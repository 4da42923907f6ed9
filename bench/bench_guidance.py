"""Benchmark of one HiFlow high-resolution guidance step: official vs ref vs fused vs native.

    python -m hiflow_fast.bench.bench_guidance --device cpu --json out.json
    hiflow-fast bench guidance --device cuda --sizes 1k,2k,4k

Paths, all doing the same work (one step on the current grid plus the move of the latents and
the velocity states onto the next step's swin grid):

* official: the official implementation's way, the baseline of bench/official_baseline.py (the
  one the e2e benchmark runs too): the Butterworth mask rebuilt by a Python loop over every
  latent pixel (one indexed assignment each, i.e. one tiny kernel launch each on a GPU), two
  complex FFT pairs with fftshift, unpack/pack copies and F.pad / slicing for the swin pad of
  the latents and the crop of the two velocity states;
* ref: `guidance_step(backend="ref")`, the plain-PyTorch reference (the CPU path);
* fused: `guidance_step(backend="triton")`, the Triton kernels (on a CPU through Triton's
  interpreter: a correctness path, timed only up to --fused-cpu-max);
* native: `guidance_step(backend="native")`, the C++/CUDA ops of csrc/ (built on first use,
  see hiflow_fast.native; when they cannot be built here the path is recorded as skipped with
  the reason). Its records carry `speedup_vs_ref`, against the ref path of the same run.

Scenario per size (latent side L of a 1K/2K/4K target, 16 channels, batch 1): the reference x0 is
the previous stage's (side L/2), the current grid is L x L, the next step runs on the swin-padded
grid (L+2) and a velocity state exists (the acceleration term is on). Each record holds the
median/min/max seconds, the peak extra memory of one call, and the floor: the bytes the step must
move (read x, v, the state and the reference; write x', x0 and the state; fp32) at the measured
copy bandwidth of the device.

Timing, memory, records and outputs come from bench/common.py. The slow paths (official; fused
through the interpreter on a CPU) run at most 3 timed repeats after one warm-up; on a CPU the
paths' timed calls are interleaved (`measure_interleaved`), so that a shared machine's slow
periods fall on all of them alike. Each call is timed on its own (`time_slow`: CUDA events without do_bench's L2 flush and its 8+ calls, which
at seconds per call do not change the median).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from hiflow_fast.bench.common import (
    add_common_arguments,
    bench_main,
    case_skip_reason,
    comma_list,
    copy_bandwidth,
    device_heading,
    free_device_memory,
    make_record,
    markdown_table,
    measure_interleaved,
    measure_time,
    peak_extra_bytes,
    start,
)
from hiflow_fast.errors import HiFlowInputError
from hiflow_fast.guidance import VelocityState, guidance_step
from hiflow_fast.ref.butterworth import butterworth_lowpass_mask

BENCH_NAME = "guidance"
# Latent side of each target size (image / 8): 1024 -> 128, 2048 -> 256, 4096 -> 512.
SIZES = {"1k": 128, "2k": 256, "4k": 512}
CHANNELS = 16
# Step settings of a mid-stage step (official defaults: filter ratio 0.2, Butterworth order 4).
STEP = dict(sigma=0.5, sigma_next=0.35, alpha=0.5, beta=0.25, filter_ratio=0.2, butterworth_order=4)
PATHS = ("official", "ref", "fused", "native")


# --------------------------------------------------------------------------------------------
# The official baseline (bench/official_baseline.py) in this benchmark's scenario
# --------------------------------------------------------------------------------------------


def official_mask_vectorised(shape: tuple[int, ...], ratio: float, order: int, device) -> torch.Tensor:
    """Same values and the same [1, C, h, w] allocation as the official per-pixel loop
    (`official_baseline.official_butterworth_mask`), without the loop: used only for the official
    path's memory measurement on a CPU, where the profiler that sees allocations would record
    262,144 indexed assignments one by one."""
    mask = torch.zeros(shape, device=device)
    mask[...] = butterworth_lowpass_mask(shape[-2], shape[-1], ratio, order, device=device)
    return mask


def official_step(inputs: dict[str, Any], *, mask_fn=None):
    """One official step including the swin moves, as the official pipeline does them around it:
    both stored velocity states cropped from the padded grid onto this step's grid, then the step
    (`official_guidance_step`), then the latents padded onto the next step's grid, each move an
    unpack -> F.pad / slice -> pack copy."""
    # Imported here: official_baseline imports diffusers, which imports triton, and `--paths
    # fused` on a CPU must switch Triton to its interpreter before that.
    from hiflow_fast.bench.official_baseline import official_guidance_step, swin_move_packed

    hw, next_hw = inputs["hw"], inputs["next_hw"]
    v_prev, v_ref_prev = (swin_move_packed(state, next_hw, hw) for state in inputs["state_prev"])
    x_next, pred_x0, v, v_ref = official_guidance_step(
        inputs["sample"], inputs["model_output"], inputs["ref_x0"], hw=hw, ref_hw=inputs["ref_hw"],
        v_prev=v_prev, v_ref_prev=v_ref_prev, mask_fn=mask_fn, **STEP,
    )
    return swin_move_packed(x_next, hw, next_hw), pred_x0, v, v_ref


# --------------------------------------------------------------------------------------------
# Bench
# --------------------------------------------------------------------------------------------


def make_inputs(side: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hw, ref_hw, padded = (side, side), (side // 2, side // 2), (side + 2, side + 2)

    def packed(grid):
        return torch.randn(1, (grid[0] // 2) * (grid[1] // 2), 4 * CHANNELS, generator=g).to(device)

    return dict(
        sample=packed(hw), model_output=packed(hw), ref_x0=packed(ref_hw),
        state_cur=(packed(hw), packed(hw)),  # state as our paths leave it (on this step's grid)
        state_prev=(packed(padded), packed(padded)),  # as the official code stores it
        hw=hw, ref_hw=ref_hw, next_hw=padded,
    )


def path_fn(path: str, inputs: dict, *, for_memory: bool = False):
    """A zero-argument callable doing one step of `path` on `inputs` (for_memory: the official
    path builds its mask vectorised, see `official_mask_vectorised`)."""
    if path == "official":
        mask_fn = official_mask_vectorised if for_memory else None
        return lambda: official_step(inputs, mask_fn=mask_fn)
    backend = {"ref": "ref", "fused": "triton", "native": "native"}[path]
    v, v_ref = inputs["state_cur"]
    return lambda: guidance_step(
        inputs["sample"], inputs["model_output"], inputs["ref_x0"], hw=inputs["hw"], ref_hw=inputs["ref_hw"],
        next_hw=inputs["next_hw"], state=VelocityState(v, v_ref, inputs["hw"]), backend=backend, **STEP,
    )


def bytes_floor(side: int) -> int:
    """Bytes one step must move in fp32: read x, v_model, v_prev, v_ref_prev and the reference
    (a quarter latent), write x', x0, v, v_ref: 8.25 latents."""
    latent = CHANNELS * side * side * 4
    return int(8 * latent + latent // 4)


def parse_sizes(text: str) -> list[tuple[str, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item in SIZES:
            sizes.append((item, SIZES[item]))
        elif item.isdigit() and int(item) % 4 == 0 and int(item) > 0:
            sizes.append((f"{int(item) * 8}px", int(item)))
        else:
            raise HiFlowInputError("--sizes", item, f"one of {', '.join(SIZES)} or a latent side divisible by 4")
    if not sizes:
        raise HiFlowInputError("--sizes", text, "at least one size")
    return sizes


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench guidance", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, threads=True)
    parser.add_argument("--sizes", default="1k,2k,4k", help="comma list of 1k, 2k, 4k or latent sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path and size (default 5)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma list of official, ref, fused, native")
    parser.add_argument("--fused-cpu-max", type=int, default=128,
                        help="on the CPU, time the fused path (Triton interpreter) only up to this latent side")
    args = parser.parse_args(argv)
    args.sizes = parse_sizes(args.sizes)
    args.paths = comma_list("--paths", args.paths, PATHS)
    if args.repeats < 1:
        raise HiFlowInputError("--repeats", args.repeats, "an integer >= 1")
    return args


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    device, outputs, environment = start(args)
    paths = args.paths
    if "fused" in paths:
        from hiflow_fast.interpreter import prepare_interpreter

        # Triton on a CPU runs its interpreter, which must be chosen before triton is imported.
        prepare_interpreter("triton", None)
    unavailable: dict[str, str] = {}  # path -> why it cannot run on this machine (recorded as skipped)
    if "native" in paths:
        from hiflow_fast.native import load_native_ops

        try:  # built (once, into the user cache) before any timing
            load_native_ops(device_type=device.type)
        except HiFlowInputError as exc:
            unavailable["native"] = str(exc)
    bandwidth = copy_bandwidth(device)
    print(f"{device_heading(environment, device)}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    rows = []
    for label, side in args.sizes:
        inputs = make_inputs(side, device)
        floor_bytes = bytes_floor(side)
        floor_s = floor_bytes / bandwidth
        row: dict[str, Any] = {"size": f"{label} ({CHANNELS}x{side}x{side})"}
        records = []
        timed = []
        for path in paths:
            if path == "fused" and device.type == "cpu" and side > args.fused_cpu_max:
                print(f"  {label}: fused skipped on cpu (interpreter; --fused-cpu-max {args.fused_cpu_max})")
                continue
            if path not in unavailable:
                timed.append(path)
        slow = {p for p in timed if p == "official" or (p == "fused" and device.type == "cpu")}
        repeats = {p: max(1, min(args.repeats, 3) if p in slow else args.repeats) for p in timed}
        failed: dict[str, str] = {}  # path -> why it could not run (recorded as skipped)
        if device.type == "cpu":
            # A shared CPU's slow periods would otherwise fall on one path only (the official
            # path's 3 calls take seconds): interleave the paths' calls.
            try:
                timings = measure_interleaved({p: path_fn(p, inputs) for p in timed}, device, repeats, warmup=1)
            except Exception as exc:  # interleaved: which path raised is in the traceback
                failed = dict.fromkeys(timed, case_skip_reason(exc))
        else:
            timings = {}
            for p in timed:
                try:
                    timings[p] = measure_time(path_fn(p, inputs), device, repeats=repeats[p], warmup=1, slow=p in slow)
                except Exception as exc:  # e.g. a kernel that fails to compile: the other paths still run
                    failed[p] = case_skip_reason(exc)
                    free_device_memory(device)
        free_device_memory(device)
        for path in [p for p in paths if p in timed or p in unavailable]:
            case = dict(
                latent_hw=(side, side), floor_s=floor_s,
                channels=CHANNELS, batch=1, ref_hw=list(inputs["ref_hw"]), next_hw=list(inputs["next_hw"]),
                dtype="float32", bytes_floor=floor_bytes, copy_bandwidth_bytes_per_s=bandwidth,
                interpreter=bool(path == "fused" and device.type == "cpu"), threads=torch.get_num_threads(),
            )
            reason = failed.get(path) or unavailable.get(path)
            if reason is None:
                free_device_memory(device)
                try:
                    peak = peak_extra_bytes(path_fn(path, inputs, for_memory=device.type == "cpu"), device)
                except Exception as exc:
                    reason = case_skip_reason(exc)
                    free_device_memory(device)
            if reason is None:
                timing = timings[path]
                record = make_record(BENCH_NAME, device, path, timing, peak, environment, **case)
            else:
                print(f"  {label} {path}: skipped ({reason})")
                record = make_record(BENCH_NAME, device, path, None, None, environment, skipped=reason, **case)
            records.append(record)
            outputs.add([record])  # each case as soon as it is measured (gpu_check's step timeouts)
            if reason is not None:
                continue
            row[f"{path}_s"] = timing.median_s
            row[f"{path}_peak_MiB"] = None if peak is None else peak / 2**20
            row[f"{path}_floor"] = record["fraction_of_floor"]
            print(f"  {label} {path:8s} median {timing.median_s * 1e3:9.2f} ms  (min {timing.min_s * 1e3:.2f}, "
                  f"max {timing.max_s * 1e3:.2f}; peak {row[f'{path}_peak_MiB'] or float('nan'):.1f} MiB)")
        for record in records:
            if record["path"] in ("fused", "native") and record["median_s"] and "ref_s" in row:
                record["speedup_vs_ref"] = row["ref_s"] / record["median_s"]
                row[f"{record['path']}_speedup_vs_ref"] = record["speedup_vs_ref"]
        best = min((row[f"{p}_s"] for p in ("ref", "fused", "native") if f"{p}_s" in row), default=None)
        if best is not None and "official_s" in row:
            row["official_over_best"] = row["official_s"] / best
            for record in records:
                if record["path"] != "official" and record["median_s"]:
                    record["speedup_vs_official"] = row["official_s"] / record["median_s"]
        outputs.add([])  # the speed-ups just set on records already written
        rows.append(row)
        del inputs
        free_device_memory(device)

    columns = [("latent", "size")]
    for p in paths:
        columns += [(f"{p} median s", f"{p}_s"), (f"{p} peak MiB", f"{p}_peak_MiB")]
    if device.type == "cuda":
        columns += [(f"{p} floor fraction", f"{p}_floor") for p in paths if p != "official"]
    columns += [(f"ref / {p}", f"{p}_speedup_vs_ref") for p in paths if p in ("fused", "native") and "ref" in paths]
    columns.append(("official / best", "official_over_best"))
    table = markdown_table(rows, columns)
    markdown = f"# guidance step bench ({environment['device_name']}, commit {environment['commit']})\n\n{table}\n"
    print()
    print(table)
    outputs.finish(markdown, title=f"guidance -- {device_heading(environment, device)}")
    return outputs.exit_status


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
