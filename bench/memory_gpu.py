"""`bench memory --device cuda`: the 2K and 4K stages under memory budgets, measured on a GPU.

A FLUX.1-dev-shaped transformer with random bf16 weights (bench/flux_shapes.py) runs sampled
steps of the 2K and 4K stages through the fast path:

1. unconstrained, every block resident: the baseline step time (same process);
2. per budget: the plan of hiflow_fast.memory_plan for the official cascade, the budget emulated
   with `torch.cuda.set_per_process_memory_fraction(budget / device memory)`, the stage's
   resident blocks placed on the device from pinned host memory and the others streamed, as a
   pipeline loaded with `memory_budget=` runs (hiflow_fast.host_placement, block_streaming;
   with --lossy also the LOSSY fp8 plans, hiflow_fast.lossy_weights); measured: peak
   allocated and reserved bytes (torch.cuda.max_memory_*), the step time and its ratio to the
   resident step time;
3. the host -> device bandwidth from pinned memory, measured in the same run.

A budget that runs out of memory is a result (recorded as skipped, with the reason). Step
times are medians of `--sample-steps` timed steps after one untimed warm-up step per stage
and plan (Triton kernels are compiled there). Not part of CI: it needs a GPU; a CPU smoke
path (`run_gpu(..., device="cpu")`) runs the same code on a tiny model for tests.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import torch

GIB = 2**30
# The stages measured: the 2K and 4K stages of the official cascade (their plans come from it).
GPU_STAGES = {"2k": 1, "4k": 2}
NTK_FACTOR = 10.0


def host_to_device_bandwidth(device: torch.device, nbytes: int = 512 * 2**20, repeats: int = 5) -> float | None:
    """Bytes per second of a pinned host -> device copy (median of `repeats`); None on a CPU."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del host, target
    return nbytes / statistics.median(times[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_steps(model, inputs, device: torch.device, steps: int) -> list[float]:
    out = []
    with torch.no_grad():
        model(**inputs, return_dict=False)  # warm-up (kernel compilation, first copies)
        for _ in range(steps):
            _sync(device)
            started = time.perf_counter()
            model(**inputs, return_dict=False)
            _sync(device)
            out.append(time.perf_counter() - started)
    return out


def run_gpu(args, budgets: list[float], *, device: str = "cuda", model_size: str = "full") -> int:
    """Measure the stages under each budget; write records through bench/common.py's outputs."""
    from hiflow_fast.bench import flux_shapes as fs
    from hiflow_fast.bench.bench_transformer import model_inputs
    from hiflow_fast.bench.common import case_skip_reason, make_record, markdown_table, start
    from hiflow_fast.block_streaming import BlockStreamer, transformer_blocks
    from hiflow_fast.lossy_weights import Fp8BlockWeights
    from hiflow_fast.errors import HiFlowInputError
    from hiflow_fast.fast_transformer import fast_transformer
    from hiflow_fast.memory_plan import OFFICIAL_STAGES, TransformerShape, plan_memory, stage_specs

    if device == "cuda":
        dev, outputs, environment = start(args)
    else:  # the CPU smoke path of the tests
        from hiflow_fast.bench.common import Outputs, run_environment

        dev, outputs, environment = torch.device("cpu"), Outputs(), run_environment("cpu")
    stage_names = [s.strip() for s in getattr(args, "gpu_stages", "2k,4k").split(",") if s.strip()]
    for name in stage_names:
        if name not in GPU_STAGES:
            raise HiFlowInputError("--gpu-stages", name, "2k and/or 4k")
    size = fs.model_size(model_size)
    # The cascade the plans are made for: the official one at full size, a small one otherwise.
    cascade = OFFICIAL_STAGES if model_size == "full" else stage_specs((128, 128), 4, [(192, 192), (256, 256)], [2, 2])
    model = fs.build_transformer(size, device=dev, dtype=torch.bfloat16)
    shape = TransformerShape.from_config(dict(model.config), text_tokens=size.text_tokens)
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else None
    bandwidth = host_to_device_bandwidth(dev)
    records: list[dict[str, Any]] = []

    def add(record):
        records.append(record)
        outputs.add([record])

    resident_times: dict[str, float] = {}
    with fast_transformer(model) as patch:
        patch.use_highres(NTK_FACTOR)
        inputs = {name: model_inputs(model, cascade[GPU_STAGES[name]].image_tokens, size.text_tokens, dev, torch.bfloat16)
                  for name in stage_names}
        for name in stage_names:  # 1. unconstrained, every block resident
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times = _timed_steps(model, inputs[name], dev, args.sample_steps)
            resident_times[name] = statistics.median(times)
            add(make_record("memory.stage_step", dev, "resident", None, None, environment, stage=name, budget_gib=None,
                            plan="resident", exact=True, step_s=resident_times[name], step_ratio=1.0,
                            peak_allocated_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                            peak_reserved_bytes=torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None,
                            host_to_device_bytes_per_s=bandwidth))
        # 2. per budget, as a pipeline loaded with memory_budget= runs (hiflow_fast.host_placement):
        # every block in pinned host memory, the plan's resident ones copied onto the device per
        # stage, the others streamed. With --lossy, the fp8 plans too (hiflow_fast.lossy_weights).
        for block in transformer_blocks(model):
            for p in block.parameters():
                if dev.type == "cuda":  # one device -> pinned host copy (~1 s for 23.8 GB), no pageable step
                    p.data = torch.empty(p.shape, dtype=p.dtype, pin_memory=True).copy_(p.data)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for lossy in (None, "fp8") if getattr(args, "lossy", False) else (None,):
            casting = Fp8BlockWeights(model, torch.bfloat16, pin=dev.type == "cuda") if lossy else contextlib.nullcontext()
            with casting, BlockStreamer(model, dev, host_origin=True) as streamer:
                for gib in budgets:
                    try:
                        plan = plan_memory(int(gib * GIB), cascade, shape=shape, lossy=lossy)
                    except HiFlowInputError as exc:
                        for name in stage_names:
                            add(make_record("memory.stage_step", dev, f"budget-{gib:g}", None, None, environment, stage=name,
                                            budget_gib=gib, plan=None, exact=lossy is None, skipped=f"no plan: {exc}"))
                        continue
                    for name in stage_names:
                        stage = plan.stages[GPU_STAGES[name]]
                        extra = dict(stage=name, budget_gib=gib, plan=plan.name, exact=plan.exact,
                                     resident_blocks=len(stage.resident_blocks), streamed_blocks=len(stage.streamed_blocks),
                                     estimated_peak_bytes=stage.peak_bytes, host_to_device_bytes_per_s=bandwidth)
                        try:
                            streamer.prefetch = max(1, stage.prefetch or 1)
                            streamer.set_resident(stage.resident_blocks)
                            if dev.type == "cuda":
                                torch.cuda.empty_cache()
                                torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total), dev)
                                torch.cuda.reset_peak_memory_stats(dev)
                            times = _timed_steps(model, inputs[name], dev, args.sample_steps)
                            step = statistics.median(times)
                            add(make_record("memory.stage_step", dev, plan.name, None,
                                            torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None, environment,
                                            step_s=step, step_ratio=step / resident_times[name],
                                            peak_allocated_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                                            peak_reserved_bytes=torch.cuda.max_memory_reserved(dev) if dev.type == "cuda" else None,
                                            fits=(torch.cuda.max_memory_reserved(dev) <= gib * GIB) if dev.type == "cuda" else None,
                                            **extra))
                        except Exception as exc:  # out of memory is a result; anything else a failure
                            add(make_record("memory.stage_step", dev, plan.name, None, None, environment,
                                            skipped=case_skip_reason(exc), **extra))
                        finally:
                            if dev.type == "cuda":
                                torch.cuda.set_per_process_memory_fraction(1.0, dev)
    rows = [{"stage": r["stage"], "budget": r.get("budget_gib"), "plan": r.get("plan"),
             "step": "-" if r.get("step_s") is None else f"{r['step_s']:.3f} s",
             "ratio": "-" if r.get("step_ratio") is None else f"{r['step_ratio']:.2f}x",
             "alloc": "-" if r.get("peak_allocated_bytes") is None else f"{r['peak_allocated_bytes'] / GIB:.2f} GiB",
             "reserved": "-" if r.get("peak_reserved_bytes") is None else f"{r['peak_reserved_bytes'] / GIB:.2f} GiB",
             "skipped": r.get("skipped", "")} for r in records]
    table = markdown_table(rows, [("stage", "stage"), ("budget GiB", "budget"), ("plan", "plan"), ("step", "step"),
                                  ("vs resident", "ratio"), ("peak allocated", "alloc"), ("peak reserved", "reserved"),
                                  ("skipped", "skipped")])
    print(table)
    if bandwidth:
        print(f"host -> device (pinned): {bandwidth / 1e9:.1f} GB/s")
    title = "HiFlow 2K/4K stages under memory budgets (FLUX.1-dev shapes, random bf16 weights)"
    outputs.finish(f"# {title}\n\n{table}\n", title=title)
    return outputs.exit_status
