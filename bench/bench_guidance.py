"""Benchmark of one HiFlow high-resolution guidance step: official vs ref vs fused.

    python -m hiflow_fast.bench.bench_guidance --device cpu --json out.json
    hiflow-fast bench guidance --device cuda --sizes 1k,2k,4k

Paths, all doing the same work (one step on the current grid plus the move of the latents and
the velocity states onto the next step's swin grid):

* official: the official implementation's way, re-implemented faithfully as the baseline: the
  Butterworth mask rebuilt by a Python loop over every latent pixel (one indexed assignment each,
  i.e. one tiny kernel launch each on a GPU), two complex FFT pairs with fftshift, unpack/pack
  copies and F.pad / slicing for the swin pad and the state crop;
* ref: `guidance_step(backend="ref")`, the plain-PyTorch reference (the CPU path);
* fused: `guidance_step(backend="triton")`, the Triton kernels (on a CPU through Triton's
  interpreter: a correctness path, timed only up to --fused-cpu-max).

Scenario per size (latent side L of a 1K/2K/4K target, 16 channels, batch 1): the reference x0 is
the previous stage's (side L/2), the current grid is L x L, the next step runs on the swin-padded
grid (L+2) and a velocity state exists (the acceleration term is on). Each record holds the
median/min/max seconds, the peak extra memory of one call, and the floor: the bytes the step must
move (read x, v, the state and the reference; write x', x0 and the state; fp32) at the measured
copy bandwidth of the device.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from hiflow_fast import latents as L
from hiflow_fast.bench.common import (
    copy_bandwidth,
    make_record,
    markdown_table,
    measure_time,
    peak_extra_bytes,
    run_environment,
    write_json,
)
from hiflow_fast.guidance import VelocityState, guidance_step
from hiflow_fast.ref.butterworth import butterworth_lowpass_mask
from hiflow_fast.ref.spectral_blend import fft_lowpass_official

BENCH_NAME = "guidance"
# Latent side of each target size (image / 8): 1024 -> 128, 2048 -> 256, 4096 -> 512.
SIZES = {"1k": 128, "2k": 256, "4k": 512}
CHANNELS = 16
# Step settings of a mid-stage step (official defaults: filter ratio 0.2, Butterworth order 4).
STEP = dict(sigma=0.5, sigma_next=0.35, alpha=0.5, beta=0.25, filter_ratio=0.2, butterworth_order=4)
PATHS = ("official", "ref", "fused")
# The official velocity epsilon.
VELOCITY_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# The official baseline
# --------------------------------------------------------------------------------------------


def official_butterworth_mask(shape: tuple[int, ...], order: int, ratio: float, device) -> torch.Tensor:
    """The official mask construction: one Python iteration and one indexed assignment per pixel
    of a [1, C, h, w] tensor created on the device (so one tiny kernel launch each on a GPU)."""
    height, width = shape[-2], shape[-1]
    mask = torch.zeros(shape, device=device)
    if ratio == 0:
        return mask
    for h in range(height):
        for w in range(width):
            d_square = (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2
            mask[..., h, w] = 1 / (1 + (d_square / ratio**2) ** order)
    return mask


def official_mask_vectorised(shape: tuple[int, ...], order: int, ratio: float, device) -> torch.Tensor:
    """Same values and the same [1, C, h, w] allocation as `official_butterworth_mask`, without
    the loop: used only for the official path's memory measurement on a CPU, where the profiler
    that sees allocations would record 262,144 indexed assignments one by one."""
    mask = torch.zeros(shape, device=device)
    mask[...] = butterworth_lowpass_mask(shape[-2], shape[-1], ratio, order, device=device)
    return mask


def official_step(sample, model_output, ref_x0, state_v, state_v_ref, *, hw, ref_hw, state_hw, next_hw,
                  sigma, sigma_next, alpha, beta, filter_ratio, butterworth_order,
                  mask_fn=official_butterworth_mask):
    """One official step (fft structure guidance, latent upsampling, v_theta flow) including the
    swin moves: the stored states are padded/cropped onto this step's grid at its start and the
    latents onto the next step's grid at its end, each through unpack -> F.pad/slice -> pack."""
    h, w = hw

    def move(packed, src_hw, dst_hw):
        if tuple(src_hw) == tuple(dst_hw):
            return packed
        unpacked = L.unpack(packed, *src_hw)
        if dst_hw[0] > src_hw[0]:
            return L.pack(F.pad(unpacked, (1, 1, 1, 1)))
        return L.pack(unpacked[:, :, 1:-1, 1:-1].contiguous())

    state_v = move(state_v, state_hw, hw)
    state_v_ref = move(state_v_ref, state_hw, hw)
    pred_x0 = sample - sigma * model_output
    x = L.unpack(sample, h, w)
    x0 = L.unpack(pred_x0, h, w)
    ref = F.interpolate(L.unpack(ref_x0, *ref_hw), size=(h, w), mode="bicubic", align_corners=False)
    mask = mask_fn((1, x0.shape[1], h, w), butterworth_order, filter_ratio, x0.device)
    x0 = x0 + alpha * (fft_lowpass_official(ref, mask) - fft_lowpass_official(x0, mask))
    v = (x - x0) / (sigma + VELOCITY_EPS)
    v_ref = (x - ref) / (sigma + VELOCITY_EPS)
    v = v + beta * ((L.unpack(state_v, h, w) - L.unpack(state_v_ref, h, w)) - (v - v_ref))
    x_next = L.pack(x + (sigma_next - sigma) * v)
    return move(x_next, hw, next_hw), pred_x0, L.pack(v), L.pack(v_ref)


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
    common = dict(hw=inputs["hw"], ref_hw=inputs["ref_hw"], next_hw=inputs["next_hw"])
    if path == "official":
        v, v_ref = inputs["state_prev"]
        mask_fn = official_mask_vectorised if for_memory else official_butterworth_mask
        return lambda: official_step(
            inputs["sample"], inputs["model_output"], inputs["ref_x0"], v, v_ref,
            state_hw=inputs["next_hw"], mask_fn=mask_fn, **common, **STEP,
        )
    backend = {"ref": "ref", "fused": "triton"}[path]
    v, v_ref = inputs["state_cur"]
    return lambda: guidance_step(
        inputs["sample"], inputs["model_output"], inputs["ref_x0"],
        state=VelocityState(v, v_ref, inputs["hw"]), backend=backend, **common, **STEP,
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
            raise SystemExit(f"--sizes: {item!r} is not one of {', '.join(SIZES)} or a latent side divisible by 4")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench guidance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--sizes", default="1k,2k,4k", help="comma list of 1k, 2k, 4k or latent sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path and size (default 5)")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma list of official, ref, fused")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); 1 avoids OpenMP barrier stalls on a busy machine")
    parser.add_argument("--fused-cpu-max", type=int, default=128,
                        help="on the CPU, time the fused path (Triton interpreter) only up to this latent side")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    for p in paths:
        if p not in PATHS:
            print(f"--paths: {p!r} is not one of {', '.join(PATHS)}", file=sys.stderr)
            return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"--threads: {args.threads} is not allowed: a positive integer", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    environment = run_environment(device)
    bandwidth = copy_bandwidth(device)
    print(f"device: {environment['device_name']}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s")

    records, rows = [], []
    for label, side in parse_sizes(args.sizes):
        inputs = make_inputs(side, device)
        floor_bytes = bytes_floor(side)
        floor_s = floor_bytes / bandwidth
        row = {"size": f"{label} ({CHANNELS}x{side}x{side})"}
        for path in paths:
            if path == "fused" and device.type == "cpu" and side > args.fused_cpu_max:
                print(f"  {label}: fused skipped on cpu (interpreter; --fused-cpu-max {args.fused_cpu_max})")
                continue
            fn = path_fn(path, inputs)
            slow = path == "official" or (path == "fused" and device.type == "cpu")
            repeats = max(1, min(args.repeats, 3) if slow else args.repeats)
            timing = measure_time(fn, device, repeats=repeats, warmup=1)
            gc.collect()
            memory_fn = path_fn(path, inputs, for_memory=device.type == "cpu")
            peak = peak_extra_bytes(memory_fn, device)
            record = make_record(
                BENCH_NAME, device, (side, side), path, timing, peak, environment,
                channels=CHANNELS, batch=1, ref_hw=list(inputs["ref_hw"]), next_hw=list(inputs["next_hw"]),
                dtype="float32", bytes_floor=floor_bytes, floor_s=floor_s,
                floor_fraction=floor_s / timing.median_s, copy_bandwidth_bytes_per_s=bandwidth,
                interpreter=bool(path == "fused" and device.type == "cpu"), cpu_threads=torch.get_num_threads(),
            )
            records.append(record)
            row[f"{path}_s"] = timing.median_s
            row[f"{path}_peak_MiB"] = None if peak is None else peak / 2**20
            row[f"{path}_floor"] = record["floor_fraction"]
            print(f"  {label} {path:8s} median {timing.median_s * 1e3:9.2f} ms  (min {timing.min_s * 1e3:.2f}, "
                  f"max {timing.max_s * 1e3:.2f}; peak {row[f'{path}_peak_MiB'] or float('nan'):.1f} MiB)")
        best = min((row[f"{p}_s"] for p in ("ref", "fused") if f"{p}_s" in row), default=None)
        if best is not None and "official_s" in row:
            row["official_over_best"] = row["official_s"] / best
            for record in records:
                if record["latent_hw"] == [side, side] and record["path"] != "official":
                    record["speedup_vs_official"] = row["official_s"] / record["median_s"]
        rows.append(row)
        del inputs
        gc.collect()

    columns = [("latent", "size")]
    for p in paths:
        columns += [(f"{p} median s", f"{p}_s"), (f"{p} peak MiB", f"{p}_peak_MiB")]
    if device.type == "cuda":
        columns += [(f"{p} floor fraction", f"{p}_floor") for p in paths if p != "official"]
    columns.append(("official / best", "official_over_best"))
    table = markdown_table(rows, columns)
    print()
    print(table)
    if args.json is not None:
        write_json(args.json, records)
        print(f"wrote {len(records)} records to {args.json}")
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(
            f"# guidance step bench ({environment['device_name']}, commit {environment['commit']})\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
