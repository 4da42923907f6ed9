"""`hiflow-fast bench e2e --parallel SPEC`: the cascade on several GPUs (or CPU processes) under
context parallelism, stage by stage, against one.

    torchrun --nproc-per-node 8 -m hiflow_fast.cli bench e2e --device cuda --parallel ulysses=8 --json e2e8.json
    torchrun --nproc-per-node 4 -m hiflow_fast.cli bench e2e --device cuda --parallel ulysses=2,ring=2 --sample-steps 2
    torchrun --nproc-per-node 2 -m hiflow_fast.cli bench e2e --device cpu --parallel ring=2   # smoke: seconds

Every rank builds the same random-weight models (fixed seeds) and the same noises and runs
`ours` with `pipe.enable_parallelism(SPEC)` (hiflow_fast.parallel.init_distributed first: gloo on
a CPU, NCCL on GPUs); the ranks start each timed run together (a barrier) and rank 0's clock
times it. Then, as the baseline of the scaling efficiency, rank 0 runs the same plans alone
while the others wait (`--single-rank`, the default), or the single-GPU stage times come from an
earlier `bench e2e --json` run (`--baseline-json`). Per stage the records hold the time on N
ranks, the single-rank time, speedup = single / N-rank, scaling efficiency = speedup / N, and the
communication volume per step, counted from the shapes (bench/parallel_model.comm_per_step:
Ulysses all-to-alls of q, k, v and the output, ring all-gathers of k and v, the proj_out
all-gather; per rank and in total; bytes in the model dtype). Only rank 0 prints and writes.

A failing rank raises; torchrun then ends the others, and every collective has a timeout
(--collective-timeout), so no rank waits for ever.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import statistics
import time
from typing import Any

import torch

from hiflow_fast import latents as L
from hiflow_fast.bench import flux_shapes as fs
from hiflow_fast.bench import parallel_model as pm
from hiflow_fast.bench.bench_e2e import (
    BENCH_NAME,
    DTYPES,
    TEXT_NOTE,
    Plan,
    _step_grids,
    _work,
    build_models,
    make_noises,
    measure_plan,
    run_once,
)
from hiflow_fast.bench.common import (
    Outputs,
    PeakMemory,
    device_heading,
    free_device_memory,
    make_record,
    markdown_table,
    nvml_snapshot,
    start,
)
from hiflow_fast.errors import HiFlowInputError


def stage_comm(plan: Plan, size: fs.ModelSize, spec, dtype_bytes: int, swin: bool) -> dict[str, dict[str, float]]:
    """Per stage name: the communication of its planned steps (bench/parallel_model.comm_per_step,
    one per step grid): bytes per step of the busiest rank and of all ranks (means over the
    steps), bytes of the whole stage, collectives per step."""
    grids = {"base": [L.latent_hw(plan.base[0], plan.base[1])] * plan.base[2]}
    for k, (h, w, steps) in enumerate(plan.stages, start=1):
        grids[f"stage{k}"] = _step_grids(L.latent_hw(h, w), steps, swin)
    out = {}
    for name, stage_grids in grids.items():
        volumes = [pm.comm_per_step(spec.ulysses, spec.ring, fs.image_tokens(*g), size.text_tokens, size.transformer, dtype_bytes)
                   for g in stage_grids]
        out[name] = dict(
            comm_bytes_per_step_rank=statistics.fmean(v.critical for v in volumes),
            comm_bytes_per_step_total=statistics.fmean(v.total for v in volumes),
            comm_bytes_stage_total=float(sum(v.total for v in volumes)),
            collectives_per_step=statistics.fmean(v.collectives for v in volumes),
        )
    out["decode"] = dict(comm_bytes_per_step_rank=0.0, comm_bytes_per_step_total=0.0, comm_bytes_stage_total=0.0,
                         collectives_per_step=0.0)
    out["total"] = dict(comm_bytes_stage_total=sum(v["comm_bytes_stage_total"] for v in out.values()))
    return out


def baseline_from_json(path, plans: list[Plan], model: str, dtype: str) -> dict[str, dict[str, float]]:
    """plan name -> stage -> single-GPU median seconds, from an earlier single-GPU `bench e2e`
    run's records (same plan spec, model and dtype); HiFlowInputError when a plan is missing."""
    records = pm.load_records(path)
    found: dict[str, dict[str, float]] = {}
    for plan in plans:
        stages = {
            r["stage"]: float(r["median_s"])
            for r in records
            if r.get("name") == BENCH_NAME and r.get("path") == "ours" and not r.get("parallel")
            and r.get("plan_spec") == plan.describe() and r.get("model") == model and r.get("dtype") == dtype
            and r.get("median_s")
        }
        if "total" not in stages:
            raise HiFlowInputError("--baseline-json", str(path),
                                   f"single-GPU `bench e2e` records of ours on plan {plan.describe()} ({model}, {dtype})")
        found[plan.name] = stages
    return found


def main_parallel(args) -> int:
    """`bench e2e --parallel`: see the module docstring. Every rank runs this."""
    import torch.distributed as dist

    from hiflow_fast.parallel import check_heads, init_distributed, is_main_process
    from hiflow_fast.pipeline import HiFlowPipeline

    spec = args.parallel
    size = fs.model_size(args.model)
    check_heads(spec, size.transformer["num_attention_heads"], "--parallel")
    baseline = baseline_from_json(args.baseline_json, args.plans, size.name, args.dtype) if args.baseline_json else None
    Outputs.from_args(args)  # an existing output is refused on every rank alike, before the launch's work
    device = init_distributed(spec, args.device, timeout_s=args.collective_timeout)
    main = is_main_process()
    if not main:  # only rank 0 writes files
        args.json = args.markdown = args.plot = None
    # The ranks wait for each other on the host (gloo), with the timeout, whatever the device.
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=args.collective_timeout))
    barrier = lambda: dist.barrier(group=waiting)  # noqa: E731
    # While rank 0 runs the single-rank baseline alone (a whole plan, repeats included: it can
    # outlast --collective-timeout), the others wait on a group with no practical timeout; if
    # rank 0 dies there, torchrun stops them.
    baseline_wait = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    baseline_barrier = lambda: dist.barrier(group=baseline_wait)  # noqa: E731
    quiet = contextlib.nullcontext() if main else contextlib.redirect_stdout(io.StringIO())
    try:
        with quiet:
            status = _run(args, spec, size, device, baseline, barrier, baseline_barrier, main, HiFlowPipeline)
        barrier()
    finally:
        dist.destroy_process_group()
    return status


def _run(args, spec, size, device, baseline, barrier, baseline_barrier, main: bool, pipeline_cls) -> int:
    _, outputs, environment = start(args)
    dtype = DTYPES[args.dtype]
    world = spec.world_size
    heading = device_heading(environment, device)
    print(f"e2e --parallel {spec} ({world} ranks, {spec.mode}) on {heading}; model {size.name} ({size.description}), "
          f"{args.dtype}; {TEXT_NOTE}")
    models = build_models(size, device, dtype)
    pipe = pipeline_cls(models.transformer, models.vae, models.scheduler, parallel=spec)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    common = dict(
        model=size.name, dtype=args.dtype, text_tokens=size.text_tokens, sample_steps=args.sample_steps,
        attention=args.attention, backend=args.backend, parallel=str(spec), parallel_mode=spec.mode,
        ulysses=spec.ulysses, ring=spec.ring, world_size=world, text_encoding_timed=False, note=TEXT_NOTE,
        threads=torch.get_num_threads(),
    )
    if args.prime:
        _prime(args.plans[0], models, device, args, pipe, barrier, "parallel")
    sections = []
    for plan in args.plans:
        print(f"  plan {plan.name} ({plan.describe()}) ours on {world} ranks ...", flush=True)
        parallel = measure_plan("ours", plan, models, device, args, pipe=pipe, before_run=barrier)
        nvml = nvml_snapshot(device)
        free_device_memory(device)
        single, source = None, None
        if args.single_rank:
            barrier()
            if main:
                if args.prime:
                    _prime(plan, models, device, args, None, lambda: None, "single-rank")
                print(f"  plan {plan.name} ours on rank 0 alone (the baseline; the other ranks wait) ...", flush=True)
                single = {s["stage"]: s["timing"].median_s for s in measure_plan("ours", plan, models, device, args)}
                source = "single-rank run of rank 0 in the same launch"
                free_device_memory(device)
            baseline_barrier()
        elif baseline is not None:
            single, source = baseline[plan.name], f"--baseline-json {args.baseline_json}"
        if not main:
            continue
        comm = stage_comm(plan, size, spec, dtype_bytes, plan.config().swin_patchify)
        records = []
        for summary in parallel:
            timing, peak = summary.pop("timing"), summary.pop("peak_bytes")
            stage = summary["stage"]
            extra: dict[str, Any] = dict(comm.get(stage, {}))
            if single and single.get(stage):
                speedup = single[stage] / timing.median_s
                extra.update(single_rank_s=single[stage], single_rank_source=source, speedup_vs_single_rank=speedup,
                             scaling_efficiency=speedup / world)
            records.append(make_record(
                BENCH_NAME, device, "ours", timing, peak, environment, label=f"{plan.name}:{stage}:{spec}",
                plan=plan.name, plan_spec=plan.describe(), estimated=args.sample_steps is not None and plan.sampled(args.sample_steps) != plan,
                **summary, **extra, peak_kind=PeakMemory.kind_of(device), work=_work(summary), primed=bool(args.prime),
                **common, nvml_after=nvml,
            ))
            print(f"    {stage:8s} {world} ranks {timing.median_s:9.3f} s" + (
                f"  1 rank {extra['single_rank_s']:.3f} s  speedup {extra['speedup_vs_single_rank']:.2f}x  "
                f"efficiency {extra['scaling_efficiency']:.0%}" if "single_rank_s" in extra else ""))
        outputs.add(records)
        sections.append(_markdown(plan, records, spec, device, args.sample_steps, source))
    del models, pipe
    free_device_memory(device)
    if not main:
        return 0
    markdown = (
        f"# e2e --parallel {spec}: the HiFlow cascade on {world} ranks ({heading})\n\n"
        f"Model: {size.description}, {args.dtype}. Commit {environment.get('commit')}. Context parallelism: "
        f"{spec.mode} (ulysses {spec.ulysses} x ring {spec.ring}) via diffusers; every rank runs the guidance steps "
        f"and the VAE on the replicated latents. Communication counted from the shapes (bench/parallel_model.py). "
        f"{TEXT_NOTE.capitalize()}.\n\n" + "\n".join(sections)
    )
    print()
    print(markdown)
    outputs.finish(markdown, title=f"e2e --parallel {spec} -- {heading}")
    return outputs.exit_status


def _prime(plan: Plan, models, device, args, pipe, barrier, what: str) -> None:
    """One untimed call on the plan's primer (compiles and autotunes at the sizes this path runs)."""
    primer = plan.primer()
    config = primer.config()
    noises = make_noises(config, models.size.vae["latent_channels"], args.seed, device, models.transformer.dtype)
    start_s = time.perf_counter()
    barrier()
    run_once("ours", models, config, noises, device, args, pipe)
    print(f"  primed {what} on {primer.describe()} in {time.perf_counter() - start_s:.1f} s (untimed)")
    free_device_memory(device)


def _markdown(plan: Plan, records: list[dict[str, Any]], spec, device, sample_steps, source) -> str:
    rows = []
    for r in records:
        rows.append(dict(
            stage=r["stage"], work=r["work"], parallel_s=r["median_s"], single_s=r.get("single_rank_s"),
            speedup=r.get("speedup_vs_single_rank"), efficiency=r.get("scaling_efficiency"),
            comm_rank=None if r.get("comm_bytes_per_step_rank") is None else r["comm_bytes_per_step_rank"] / 2**20,
            comm_total=None if r.get("comm_bytes_per_step_total") is None else r["comm_bytes_per_step_total"] / 2**20,
            comm_stage=r["comm_bytes_stage_total"] / 2**20, collectives=r.get("collectives_per_step"),
        ))
    columns = [
        ("stage", "stage"), ("work", "work"), (f"{spec.world_size} ranks s", "parallel_s"), ("1 rank s", "single_s"),
        ("speedup", "speedup"), ("efficiency", "efficiency"), ("MiB/step busiest rank", "comm_rank"),
        ("MiB/step all ranks", "comm_total"), ("MiB stage, all ranks", "comm_stage"), ("collectives/step", "collectives"),
    ]
    notes = [TEXT_NOTE, f"baseline: {source}" if source else "no single-rank baseline (--no-single-rank)",
             "communication: counted from the shapes, not measured"]
    if sample_steps is not None:
        notes.append(f"estimated: each stage ran at most {sample_steps} steps; stage = entry + planned steps x measured per-step time")
    if device.type == "cpu":
        notes.append("CPU processes (gloo) running a reduced model -- not GPU results")
    return (f"### plan `{plan.name}` on {spec} ({spec.world_size} ranks): {plan.describe()}\n\n"
            + markdown_table(rows, columns) + "\n\n" + "; ".join(notes) + ".\n")
