"""Benchmark of the FLUX VAE at HiFlow's sizes: decode and encode, tiled and untiled.

    hiflow-fast bench vae --device cuda --sizes 2k,4k --json vae.json
    hiflow-fast bench vae --device cpu                      # reduced VAE, 256 x 256

At 4K the VAE round trips of HiFlow's stage entries and the final decode are the largest
non-transformer work: the official pipeline turns diffusers' tiling on after the base stage, so
tiled is the baseline (what both the official code and HiFlowPipeline run); untiled is timed
where it fits in memory (an out-of-memory failure is recorded as skipped, with the reason).

Per (size, op, mode): median/min/max seconds over warmed-up repeats (CUDA events on a GPU), the
peak memory one call allocates beyond what was live before it, and the floor: the op's FLOPs
(counted exactly for this configuration and tiling, bench/flux_shapes.py) at the matmul rate
measured in this run, or its input and output bytes at the measured copy bandwidth, whichever is
larger. Random weights in the FLUX VAE's shape (the cost does not depend on the values).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from hiflow_fast.bench import flux_shapes as fs
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
    matmul_rate,
    nvml_snapshot,
    peak_extra_bytes,
    start,
    time_slow,
)
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "vae"
SIZES = {"1k": (1024, 1024), "2k": (2048, 2048), "4k": (4096, 4096)}
OPS = ("decode", "encode")
# tiled = the official pipeline's setting after its base stage (the baseline); untiled where it fits.
MODES = ("tiled", "untiled")
BASELINE_MODE = "tiled"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parse_sizes(text: str) -> list[tuple[str, tuple[int, int]]]:
    """1k/2k/4k, a side in pixels (512) or HxW (multiples of 8)."""
    sizes = []
    for item in (s.strip().lower() for s in text.split(",")):
        if not item:
            continue
        if item in SIZES:
            sizes.append((item, SIZES[item]))
            continue
        parts = item.split("x")
        if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 and int(p) % 8 == 0 for p in parts):
            h, w = int(parts[0]), int(parts[-1])
            sizes.append((f"{h}x{w}", (h, w)))
            continue
        raise HiFlowInputError("--sizes", item, "1k, 2k, 4k, a side in pixels or HxW, multiples of 8")
    if not sizes:
        raise HiFlowInputError("--sizes", text, "at least one size")
    return sizes


def make_input(op: str, hw: tuple[int, int], vae, device, dtype) -> torch.Tensor:
    """Decode: normalised-scale latents ~ N(0, 1); encode: an image ~ U(-1, 1)."""
    g = torch.Generator().manual_seed(0)
    if op == "decode":
        down = 2 ** (len(vae.config.block_out_channels) - 1)
        x = torch.randn(1, vae.config.latent_channels, hw[0] // down, hw[1] // down, generator=g)
    else:
        x = torch.rand(1, vae.config.in_channels, *hw, generator=g) * 2 - 1
    return x.to(device=device, dtype=dtype)


def op_fn(op: str, vae, x: torch.Tensor, tiled: bool):
    def run():
        vae.use_tiling = tiled
        if op == "decode":
            return vae.decode(x, return_dict=False)[0]
        return vae.encode(x).latent_dist.mode()

    return torch.no_grad()(run)


def output_bytes(op: str, hw: tuple[int, int], vae, element_size: int) -> int:
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if op == "decode":
        return vae.config.out_channels * hw[0] * hw[1] * element_size
    return vae.config.latent_channels * (hw[0] // down) * (hw[1] // down) * element_size


def _gib(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.3f} GiB"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench vae", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--model", choices=tuple(fs.MODEL_SIZES), help="VAE size (default: full on cuda, reduced on cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--sizes", help="comma list of 1k, 2k, 4k, SIDE or HxW in pixels (default: 4k on cuda, 256 on cpu)")
    parser.add_argument("--ops", default=",".join(OPS), help="comma list of decode, encode")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of tiled, untiled")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    args = parser.parse_args(argv)
    on_gpu = args.device == "cuda"
    args.model = args.model or ("full" if on_gpu else "reduced")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.sizes = parse_sizes(args.sizes or ("4k" if on_gpu else "256"))
    args.ops = comma_list("--ops", args.ops, OPS)
    args.modes = comma_list("--modes", args.modes, MODES)
    if args.repeats < 1:
        raise HiFlowInputError("--repeats", args.repeats, "an integer >= 1")
    if args.warmup < 0:
        raise HiFlowInputError("--warmup", args.warmup, "an integer >= 0")
    return args


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    device, outputs, environment = start(args)
    dtype = DTYPES[args.dtype]
    size = fs.model_size(args.model)
    heading = device_heading(environment, device)
    rate = matmul_rate(device, dtype)
    bandwidth = copy_bandwidth(device)
    print(f"vae on {heading}; {size.name} VAE, {args.dtype}; matmul {rate / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s")
    vae = fs.build_vae(size, device, dtype)
    element = torch.tensor([], dtype=dtype).element_size()

    rows: list[dict[str, Any]] = []
    for label, hw in args.sizes:
        for op in args.ops:
            x = make_input(op, hw, vae, device, dtype)
            row: dict[str, Any] = {"size": f"{hw[0]}x{hw[1]}", "op": op}
            records: list[dict[str, Any]] = []
            for mode in args.modes:
                tiled = mode == "tiled"
                flops = fs.vae_flops(size.vae, op, *hw, tiled=tiled)
                moved = x.numel() * element + output_bytes(op, hw, vae, element)
                floor_s = max(flops / rate, moved / bandwidth)
                base = dict(
                    floor_s=floor_s, is_baseline=mode == BASELINE_MODE,
                    label=f"{op} {hw[0]}x{hw[1]}", stage=op, op=op, size=f"{hw[0]}x{hw[1]}", height=hw[0], width=hw[1],
                    model=size.name, dtype=args.dtype, tile_pixels=size.vae["sample_size"], flops=flops,
                    threads=torch.get_num_threads(),
                    bytes_floor=moved, matmul_rate_flops=rate, copy_bandwidth_bytes_per_s=bandwidth,
                )
                fn = op_fn(op, vae, x, tiled)
                try:
                    timing = time_slow(fn, device, repeats=args.repeats, warmup=args.warmup)
                    free_device_memory(device)
                    peak = peak_extra_bytes(fn, device, cpu="rss")
                except Exception as exc:  # out of memory, or e.g. a convolution cuDNN refuses at 4K
                    reason = case_skip_reason(exc)
                    print(f"  {label} {op} {mode}: skipped ({reason})")
                    records.append(make_record(BENCH_NAME, device, mode, None, None, environment, skipped=reason, **base))
                    outputs.add(records[-1:])
                    row[f"{mode}_s"] = "does not fit" if reason.startswith("out of memory") else "failed"
                    free_device_memory(device)
                    continue
                free_device_memory(device)
                records.append(make_record(BENCH_NAME, device, mode, timing, peak, environment, **base,
                                           nvml_after=nvml_snapshot(device)))
                outputs.add(records[-1:])  # each mode as soon as it is measured (gpu_check's step timeouts)
                row[f"{mode}_s"] = timing.median_s
                row[f"{mode}_peak"] = None if peak is None else peak / 2**30
                row[f"{mode}_x_floor"] = timing.median_s / floor_s
                print(f"  {label} {op:6s} {mode:8s} median {timing.median_s:8.3f} s (min {timing.min_s:.3f}, "
                      f"max {timing.max_s:.3f}; peak {_gib(peak)}; floor {floor_s:.3f} s)")
            baseline = row.get(f"{BASELINE_MODE}_s")
            if isinstance(baseline, float):
                for mode in args.modes:
                    if mode != BASELINE_MODE and isinstance(row.get(f"{mode}_s"), float):
                        row[f"{BASELINE_MODE}_over_{mode}"] = baseline / row[f"{mode}_s"]
                        for r in records:
                            if r["path"] == mode and r.get("median_s"):
                                r["baseline_over_this"] = baseline / r["median_s"]
            outputs.add([])  # the ratios just set on records already written
            rows.append(row)
            del x
            free_device_memory(device)
    del vae
    free_device_memory(device)

    peak_kind = "GPU allocated" if device.type == "cuda" else "CPU peak RSS"
    columns = [("size", "size"), ("op", "op")]
    for mode in args.modes:
        tag = " (baseline: the official setting)" if mode == BASELINE_MODE else ""
        columns += [(f"{mode} s{tag}", f"{mode}_s"), (f"{mode} / floor", f"{mode}_x_floor"),
                    (f"{mode} peak GiB ({peak_kind})", f"{mode}_peak")]
    columns += [(f"{BASELINE_MODE} / {m}", f"{BASELINE_MODE}_over_{m}") for m in args.modes if m != BASELINE_MODE]
    note = " CPU timings of a reduced VAE -- not GPU results." if device.type == "cpu" else ""
    markdown = (
        f"# vae: decode and encode, tiled and untiled ({heading})\n\n"
        f"{size.name} VAE ({'FLUX VAE shape' if size.name == 'full' else size.description}), {args.dtype}, "
        f"tiles of {size.vae['sample_size']} px. Matmul {rate / 1e12:.2f} TFLOP/s and copy {bandwidth / 1e9:.1f} GB/s "
        f"measured in this run; floor = max(FLOPs / matmul rate, bytes / copy bandwidth); peak = memory one call "
        f"allocates beyond what was live before it.{note}\n\n" + markdown_table(rows, columns) + "\n"
    )
    print()
    print(markdown)
    outputs.finish(markdown, title=f"vae -- {heading}")
    return outputs.exit_status


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
