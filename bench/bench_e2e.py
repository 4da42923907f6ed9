"""End-to-end benchmark of the HiFlow cascade: ours beside the official way, stage by stage.

    hiflow-fast bench e2e --device cuda --plans official,2k --json e2e.json
    hiflow-fast bench e2e --device cuda --plans official --sample-steps 2     # ~1.5 min on an H100
    hiflow-fast bench e2e --device cpu                                        # reduced model, tiny plans
    torchrun --nproc-per-node 8 -m hiflow_fast.cli bench e2e --parallel ulysses=8   # multi-GPU: bench/e2e_parallel.py

Both paths run on the same random-weight FLUX-shaped transformer and VAE (bench/flux_shapes.py;
FLUX.1-dev shapes in bf16 on a GPU: the cost of a pass does not depend on the weights), the same
plan, the same prompt embeddings, base noise and stage noises, in this process:

* ours: `HiFlowPipeline` as a user calls it (its fast transformer path; kernel and attention
  backends as chosen by --backend / --attention, else the pipeline's defaults; --compile for
  torch.compile + CUDA graphs, timed after a warm-up call);
* official: `OfficialWayPipeline` (bench/official_baseline.py): per-step mask loop, two FFT pairs,
  stock attention with SDPA, unfused fp32 RoPE, pack/unpack/F.pad copies.

Text encoding is not part of the timing (random prompt embeddings are given, as a user with
precomputed embeddings would). Per stage: latency (stage entry -- the VAE round trip and
re-noising -- plus its denoising steps; the final decode is its own row), peak memory (GPU: the
caching allocator's peak, weights included; CPU: the process's peak RSS), and the floor: the
stage's FLOPs (transformer + VAE, counted from the model configs) at the matmul rate measured in
this run, plus the bytes the guidance steps and weight reads must move at the measured copy
bandwidth (per phase, whichever of the two bounds is larger).

On a GPU each path first runs once, untimed, on a primer: three steps of the base stage and of
the first high-res stage, at the sizes of the first plan whose primer fits (`--prime`; `--no-prime`
to leave it out, `Plan.primer`): the costs a process pays once -- lazy module loading, Triton
compiling every kernel variant and autotuning -- then land in no timed stage.

--sample-steps N runs every stage with at most N steps and reports each stage as
entry + planned steps x the measured per-step time (even and odd swin steps separately); such
records carry `estimated: true` and the markdown says so.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiflow_fast import latents as L
from hiflow_fast.bench import flux_shapes as fs
from hiflow_fast.bench.common import (
    PeakMemory,
    Timing,
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
    start,
)
from hiflow_fast.config import HiFlowConfig, HiResStage
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "e2e"
PATHS = ("ours", "official")
TEXT_NOTE = "text encoding is not timed (random prompt embeddings are given)"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Fixed blur sigma of the stage-entry sharpening, so both paths do the same arithmetic without
# drawing random numbers (the cost does not depend on the value).
SHARPENING_SIGMA = 1.0
# Bytes one guidance step must move, in latents of the current grid (fp32): read x, v, the two
# velocity states and the reference (a quarter latent), write x', x0 and the two states.
GUIDANCE_LATENTS_MOVED = 8.25
# Activation memory of one transformer step, in [tokens x hidden] tensors of the model dtype: the
# stock path keeps the 4x-wide MLP activations, q/k/v, fp32 rotated copies of q and k and the
# concatenations of a block alive at once (~32 is what the official path needs at 4K). Used only
# to skip a plan that cannot fit before spending minutes on its first stages.
ACTIVATION_TENSORS_PER_STEP = 32
# Room for the VAE's tiled round trips and the allocator's fragmentation.
MEMORY_MARGIN_BYTES = 4 * 2**30


# ---- plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A cascade: the base stage and the high-res stages, each (height, width, steps)."""

    name: str
    base: tuple[int, int, int]
    stages: tuple[tuple[int, int, int], ...]

    def describe(self) -> str:
        return " -> ".join(f"{h}x{w} x{s}" for h, w, s in (self.base, *self.stages))

    def sampled(self, steps: int | None) -> "Plan":
        """The plan with every stage capped at `steps` steps (None: unchanged)."""
        if steps is None:
            return self
        cap = lambda s: (s[0], s[1], min(s[2], steps))  # noqa: E731
        return Plan(self.name, cap(self.base), tuple(cap(s) for s in self.stages))

    def primer(self) -> "Plan":
        """What `--prime` runs untimed first, at this plan's sizes: the base stage and the first
        high-res stage, each capped at PRIMER_STEPS (a high-res stage runs the last steps of the
        base schedule, so the base needs as many). Then no timed run pays the
        costs a process pays once: CUDA's lazy module loading, cuBLAS handles, Triton autotuning
        attention (which a user's first call also does, at the base size) and compiling every
        kernel variant a stage uses -- the guided-velocity kernel has one per way of holding the
        previous velocities (none at step 0, another grid, the same grid), and Triton compiles
        once more for sizes that are not multiples of 16 (the swin-padded grid of even steps).
        Later stages reuse those variants: their grids divide by 16 as the first stage's do."""
        capped = self.sampled(PRIMER_STEPS)
        return Plan(f"{self.name}:primer", capped.base, capped.stages[:1])

    def config(self) -> HiFlowConfig:
        """The HiFlowConfig of this plan, with the official per-stage settings (first high-res
        stage: guidance 4.5, alpha 1.0; later ones: guidance 6.0, alpha 0.25)."""
        stages = tuple(
            HiResStage(h, w, s, guidance_scale=4.5 if k == 0 else 6.0, alpha=1.0 if k == 0 else 0.25)
            for k, (h, w, s) in enumerate(self.stages)
        )
        h, w, s = self.base
        return HiFlowConfig(height=h, width=w, num_inference_steps=s, guidance_scale=3.5, stages=stages,
                            sharpening_sigma=SHARPENING_SIGMA)


PLANS: dict[str, Plan] = {
    plan.name: plan
    for plan in (
        Plan("official", (1024, 1024, 30), ((2048, 2048, 16), (4096, 4096, 10))),  # the official default
        Plan("2k", (1024, 1024, 30), ((2048, 2048, 16),)),
        # The official plan's shape (2x per stage, steps ~30:16:10) at CPU sizes.
        Plan("cpu", (64, 64, 6), ((128, 128, 3), (256, 256, 2))),
        Plan("cpu-2k", (64, 64, 6), ((128, 128, 3),)),
        Plan("tiny", (64, 64, 2), ((128, 128, 2),)),
    )
}

# Steps of a primer's stages: in the first high-res stage, step 0 (no previous velocities, padded
# grid), step 1 (previous velocities on the other grid, plain grid), step 2 (back to the padded
# grid, or without swin the velocities updated in place).
PRIMER_STEPS = 3

_CUSTOM_STAGE = re.compile(r"^(\d+)(?:x(\d+))?x(\d+)$")


def parse_plans(text: str) -> list[Plan]:
    """Plan names, or custom plans as SIZExSTEPS stages joined by '>' (e.g. 1024x30>2048x16, or
    HxWxSTEPS for non-square sizes)."""
    plans = []
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        if item in PLANS:
            plans.append(PLANS[item])
            continue
        stages = []
        for part in item.split(">"):
            m = _CUSTOM_STAGE.match(part.strip())
            if m is None:
                raise HiFlowInputError(
                    "--plans", item, f"one of {', '.join(PLANS)} or stages SIZExSTEPS joined by '>' (e.g. 1024x30>2048x16)"
                )
            h = int(m.group(1))
            w = int(m.group(2)) if m.group(2) else h
            stages.append((h, w, int(m.group(3))))
        plan = Plan(item, stages[0], tuple(stages[1:]))
        plan.config()  # validates sizes and step counts (HiFlowInputError)
        plans.append(plan)
    if not plans:
        raise HiFlowInputError("--plans", text, "at least one plan")
    return plans


# ---- what a plan costs ----------------------------------------------------------------------


@dataclass
class Phase:
    """Work of one part of a stage: FLOPs (matmul-class) and bytes that must move."""

    flops: float = 0.0
    bytes: float = 0.0


def _step_grids(hw: tuple[int, int], steps: int, swin: bool) -> list[tuple[int, int]]:
    """The latent grid of every step of a high-res stage (even steps padded with swin)."""
    return [((hw[0] + 2, hw[1] + 2) if swin and i % 2 == 0 else hw) for i in range(steps)]


def plan_phases(plan: Plan, size: fs.ModelSize, weight_bytes: int, swin: bool = True) -> dict[str, list[Phase]]:
    """Per stage ('base', 'stage1', ..., 'decode'): the phases whose floors add up to its floor."""
    tf = size.transformer
    phases: dict[str, list[Phase]] = {}
    hw = L.latent_hw(plan.base[0], plan.base[1])
    phases["base"] = [
        Phase(fs.transformer_step_flops(tf, fs.image_tokens(*hw), size.text_tokens), weight_bytes)
        for _ in range(plan.base[2])
    ]
    tiled = True  # both paths tile the VAE after the base stage (as the official pipeline)
    for k, (h, w, steps) in enumerate(plan.stages, start=1):
        entry = Phase(fs.vae_flops(size.vae, "decode", hw[0] * 8, hw[1] * 8, tiled=tiled)
                      + fs.vae_flops(size.vae, "encode", h, w, tiled=tiled))
        stage_phases = [entry]
        target = L.latent_hw(h, w)
        for grid in _step_grids(target, steps, swin):
            stage_phases.append(Phase(fs.transformer_step_flops(tf, fs.image_tokens(*grid), size.text_tokens), weight_bytes))
            stage_phases.append(Phase(0.0, GUIDANCE_LATENTS_MOVED * size.vae["latent_channels"] * grid[0] * grid[1] * 4))
        phases[f"stage{k}"] = stage_phases
        hw = _step_grids(target, steps, swin)[-1] if steps % 2 == 1 and swin else target
    phases["decode"] = [Phase(fs.vae_flops(size.vae, "decode", hw[0] * 8, hw[1] * 8, tiled=tiled))]
    return phases


def floor_seconds(phases: list[Phase], rate: float, bandwidth: float) -> float:
    """Sum over phases of max(FLOPs / matmul rate, bytes / copy bandwidth): each phase is bound by
    its compute or its memory traffic, and phases run one after the other."""
    return sum(max(p.flops / rate, p.bytes / bandwidth) for p in phases)


def activation_estimate_bytes(plan: Plan, size: fs.ModelSize, dtype: torch.dtype) -> int:
    """Rough activation need of the largest step of a plan (see ACTIVATION_TENSORS_PER_STEP)."""
    h, w, _ = max((plan.base, *plan.stages), key=lambda s: s[0] * s[1])
    tokens = fs.image_tokens(*L.latent_hw(h + 16, w + 16)) + size.text_tokens
    hidden = size.transformer["num_attention_heads"] * size.transformer["attention_head_dim"]
    return ACTIVATION_TENSORS_PER_STEP * tokens * hidden * torch.tensor([], dtype=dtype).element_size()


# ---- timing a cascade -----------------------------------------------------------------------


class StageClock:
    """Marks each stage entry and step of one pipeline call on the device's timeline (CUDA events,
    no host sync; perf_counter on a CPU) with the peak memory since the previous mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.memory = PeakMemory(device)
        self.marks: list[tuple[str, int, int, Any, int | None]] = []

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, kind: str, stage: int = -1, i: int = -1) -> None:
        self.marks.append((kind, stage, i, self._now(), self.memory.read_and_reset()))

    def __call__(self, event) -> None:  # the pipeline callback
        from hiflow_fast.pipeline import StageStart, StepEnd

        if isinstance(event, StageStart):
            self.mark("entry", event.stage)
        elif isinstance(event, StepEnd):
            self.mark("step", event.stage, event.i)

    def intervals(self) -> list[tuple[str, int, int, float, int | None]]:
        """(kind, stage, step, seconds since the previous mark, peak bytes in that interval)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        out = []
        for (_, _, _, t0, _), (kind, stage, i, t1, peak) in zip(self.marks, self.marks[1:]):
            seconds = t0.elapsed_time(t1) / 1e3 if self.device.type == "cuda" else t1 - t0
            out.append((kind, stage, i, seconds, peak))
        return out


@dataclass
class StageTimes:
    entry_s: float
    step_s: list[float]
    peak: int | None


def split_stages(intervals) -> tuple[dict[int, StageTimes], float, int | None]:
    """Per stage (0 = base) its entry and step seconds and peak; plus the final decode's."""
    stages: dict[int, StageTimes] = {}
    decode_s, decode_peak = 0.0, None
    current = 0
    for kind, stage, _, seconds, peak in intervals:
        if kind == "end":
            decode_s, decode_peak = seconds, peak
            continue
        current = stage
        times = stages.setdefault(current, StageTimes(0.0, [], None))
        if kind == "entry":
            times.entry_s += seconds
        else:
            times.step_s.append(seconds)
        if peak is not None:
            times.peak = max(times.peak or 0, peak)
    return stages, decode_s, decode_peak


def stage_seconds(times: StageTimes, planned_steps: int, alternating: bool) -> float:
    """Stage latency for `planned_steps`: measured when all ran, else entry + planned steps x the
    median per-step time (even and odd steps apart when swin patchify alternates the grid)."""
    steps = times.step_s
    if len(steps) >= planned_steps:
        return times.entry_s + sum(steps[:planned_steps])
    if not alternating:
        return times.entry_s + planned_steps * statistics.median(steps)
    even, odd = steps[0::2], steps[1::2]
    even_s = statistics.median(even)
    odd_s = statistics.median(odd) if odd else even_s
    return times.entry_s + (planned_steps + 1) // 2 * even_s + planned_steps // 2 * odd_s


# ---- one plan, one path ---------------------------------------------------------------------


@dataclass
class Models:
    size: fs.ModelSize
    transformer: Any
    vae: Any
    scheduler: Any
    embeds: torch.Tensor
    pooled: torch.Tensor
    weight_bytes: int


def build_models(size: fs.ModelSize, device: torch.device, dtype: torch.dtype) -> Models:
    transformer = fs.build_transformer(size, device, dtype)
    vae = fs.build_vae(size, device, dtype)
    embeds, pooled = fs.random_prompt(size, device, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters())
    return Models(size, transformer, vae, fs.flux_scheduler(), embeds, pooled, weight_bytes)


def make_noises(config: HiFlowConfig, channels: int, seed: int, device, dtype):
    """The base noise (unpacked) and one packed noise per high-res stage, drawn once, given to
    both paths (drawing is outside the timing for both)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, channels, *L.latent_hw(config.height, config.width), generator=g)
    stages = [
        torch.randn(1, fs.image_tokens(*L.latent_hw(s.height, s.width)), 4 * channels, generator=g)
        for s in config.stages
    ]
    return base.to(device=device, dtype=dtype), [n.to(device=device, dtype=dtype) for n in stages]


def run_once(path: str, models: Models, config: HiFlowConfig, noises, device: torch.device, args, pipe=None) -> StageClock:
    """One full call of the path's pipeline, marked stage by stage (`pipe`: a HiFlowPipeline to
    call instead of a fresh one; --parallel passes the one whose process groups it built)."""
    from hiflow_fast.bench.official_baseline import OfficialWayPipeline
    from hiflow_fast.pipeline import HiFlowPipeline

    base_noise, stage_noises = noises
    clock = StageClock(device)
    free_device_memory(device)
    clock.mark("start")
    if path == "ours":
        pipe = pipe or HiFlowPipeline(models.transformer, models.vae, models.scheduler)
        pipe(
            prompt_embeds=models.embeds, pooled_prompt_embeds=models.pooled, config=config, seed=args.seed,
            latents=base_noise, stage_noises=stage_noises, output_type="pt", backend=args.backend,
            attention=args.attention, callback=clock, progress=False, **({"compile": True} if args.compile else {}),
        )
    else:
        pipe = OfficialWayPipeline(models.transformer, models.vae, models.scheduler)
        pipe(
            prompt_embeds=models.embeds, pooled_prompt_embeds=models.pooled, config=config,
            latents=base_noise, stage_noises=stage_noises, output_type="pt", callback=clock,
        )
    clock.mark("end")
    return clock


def prime_paths(plans: list[Plan], models: Models, device: torch.device, dtype: torch.dtype, args) -> set[str]:
    """`--prime`: each path once, untimed, on the primer of the first plan whose primer fits (see
    `Plan.primer`) -> the paths primed. A primer that fails is reported and timing goes on (the
    timed run of that path records the failure, if it fails again); its records say primed false."""
    plan = next((p for p in plans if _fits(p.primer(), models, device, dtype) is None), None)
    if plan is None:
        print("  primer: none fits this device; nothing primed")
        return set()
    primer = plan.primer()
    config = primer.config()
    noises = make_noises(config, models.size.vae["latent_channels"], args.seed, device, models.transformer.dtype)
    primed = set()
    for path in args.paths:
        start_s = time.perf_counter()
        try:
            run_once(path, models, config, noises, device, args)
        except Exception as exc:
            print(f"  primer {primer.describe()} {path}: {case_skip_reason(exc)}")
        else:
            primed.add(path)
            print(f"  primed {path} on {primer.describe()} in {time.perf_counter() - start_s:.1f} s (untimed)")
        free_device_memory(device)
    return primed


def measure_plan(path: str, plan: Plan, models: Models, device: torch.device, args, pipe=None,
                 before_run=None) -> list[dict[str, Any]]:
    """Repeated runs of one path on one plan -> per-stage summaries (seconds per repeat).
    `pipe`: see run_once; `before_run`: called before every run (--parallel: a barrier, so that
    every rank starts a timed run together)."""
    run_plan = plan.sampled(args.sample_steps)
    config = run_plan.config()
    noises = make_noises(config, models.size.vae["latent_channels"], args.seed, device, models.transformer.dtype)
    before_run = before_run or (lambda: None)
    for _ in range(args.warmup):
        before_run()
        run_once(path, models, config, noises, device, args, pipe)
    planned = [plan.base[2], *(s[2] for s in plan.stages)]
    names = ["base", *(f"stage{k}" for k in range(1, len(plan.stages) + 1))]
    per_stage: dict[str, list[float]] = {n: [] for n in [*names, "decode", "total"]}
    peaks: dict[str, int | None] = {n: None for n in per_stage}
    step_medians: dict[str, list[float]] = {n: [] for n in names}
    entries: dict[str, list[float]] = {n: [] for n in names}
    measured_steps: dict[str, int] = {}
    for _ in range(args.repeats):
        before_run()
        clock = run_once(path, models, config, noises, device, args, pipe)
        stages, decode_s, decode_peak = split_stages(clock.intervals())
        total = decode_s
        for k, name in enumerate(names):
            times = stages[k]
            seconds = stage_seconds(times, planned[k], alternating=k > 0 and config.swin_patchify)
            per_stage[name].append(seconds)
            step_medians[name].append(statistics.median(times.step_s))
            entries[name].append(times.entry_s)
            measured_steps[name] = len(times.step_s)
            peaks[name] = _max(peaks[name], times.peak)
            total += seconds
        per_stage["decode"].append(decode_s)
        peaks["decode"] = _max(peaks["decode"], decode_peak)
        per_stage["total"].append(total)
    for name in [*names, "decode"]:
        peaks["total"] = _max(peaks["total"], peaks[name])
    summaries = []
    for name, samples in per_stage.items():
        summary = {"stage": name, "timing": Timing.of(samples), "peak_bytes": peaks[name]}
        if name in step_medians:
            k = names.index(name)
            h, w, _ = (plan.base, *plan.stages)[k]
            summary.update(
                size=f"{h}x{w}", steps_planned=planned[k], steps_measured=measured_steps[name],
                step_median_s=statistics.median(step_medians[name]), entry_s=statistics.median(entries[name]),
            )
        summaries.append(summary)
    return summaries


def _max(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


# ---- records and tables ---------------------------------------------------------------------


def plan_floors(plan: Plan, models: Models, rate: float, bandwidth: float) -> dict[str, tuple[float, float]]:
    """(FLOPs, floor seconds) per stage name and for 'total'."""
    phases = plan_phases(plan, models.size, models.weight_bytes)
    floors = {name: (sum(p.flops for p in ps), floor_seconds(ps, rate, bandwidth)) for name, ps in phases.items()}
    floors["total"] = (sum(f for f, _ in floors.values()), sum(s for _, s in floors.values()))
    return floors


def markdown_for_plan(plan: Plan, records: list[dict[str, Any]], device: torch.device, sample_steps: int | None) -> str:
    by_stage: dict[str, dict[str, Any]] = {}
    for r in records:
        row = by_stage.setdefault(r["stage"], {"stage": r["stage"], "work": r.get("work", "")})
        if r.get("skipped"):
            row[f"{r['path']}_s"] = "skipped"
            continue
        row[f"{r['path']}_s"] = r["median_s"]
        row[f"{r['path']}_peak"] = None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30
        row["floor_s"] = r.get("floor_s")
    for row in by_stage.values():
        ours, official, floor = row.get("ours_s"), row.get("official_s"), row.get("floor_s")
        if isinstance(ours, float) and isinstance(official, float) and ours > 0:
            row["speedup"] = official / ours
        for path, seconds in (("ours", ours), ("official", official)):
            if isinstance(seconds, float) and floor:
                row[f"{path}_x_floor"] = seconds / floor
    peak_kind = "GPU allocated" if device.type == "cuda" else "CPU peak RSS"
    columns = [
        ("stage", "stage"), ("work", "work"), ("ours s", "ours_s"), ("official s", "official_s"),
        ("official / ours", "speedup"), ("floor s", "floor_s"), ("ours / floor", "ours_x_floor"),
        ("official / floor", "official_x_floor"), (f"ours peak GiB ({peak_kind})", "ours_peak"),
        ("official peak GiB", "official_peak"),
    ]
    notes = [TEXT_NOTE]
    if sample_steps is not None:
        notes.append(f"estimated: each stage ran at most {sample_steps} steps; stage = entry + planned steps x measured per-step time")
    if device.type == "cpu":
        notes.append("CPU timings of a reduced model -- not GPU results")
    return f"### plan `{plan.name}`: {plan.describe()}\n\n" + markdown_table(list(by_stage.values()), columns) + "\n\n" + "; ".join(notes) + ".\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench e2e", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--model", choices=tuple(fs.MODEL_SIZES), help="model size (default: full on cuda, reduced on cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--plans", help=f"comma list of {', '.join(PLANS)} or custom 1024x30>2048x16 "
                                        "(default: official,2k on cuda; cpu on cpu)")
    parser.add_argument("--paths", default=None, help="comma list of ours, official (default: both; ours with --parallel)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per plan and path (default: 1 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs of the same plan first (default 0)")
    parser.add_argument("--sample-steps", type=int, default=None, help="run at most N steps per stage and extrapolate each stage")
    parser.add_argument("--prime", action=argparse.BooleanOptionalAction, default=None,
                        help="run each path once, untimed, on one step of the first plan's base and first high-res "
                             "stage before timing anything (default: on cuda, where the first call compiles kernels)")
    parser.add_argument("--backend", help="guidance backend for ours (ref, triton; default: the pipeline's choice)")
    parser.add_argument("--attention", help="attention backend for ours (default: the pipeline's choice)")
    parser.add_argument("--compile", action="store_true",
                        help="ours with compile=True (torch.compile + CUDA graphs per stage); implies --warmup 1 unless given")
    parser.add_argument("--seed", type=int, default=0)
    parallel = parser.add_argument_group("multi-GPU (under torchrun; bench/e2e_parallel.py)")
    parallel.add_argument("--parallel", metavar="SPEC",
                          help="run ours with context parallelism: ulysses=N, ring=N or ulysses=N,ring=M, launched by "
                               "torchrun --nproc-per-node N*M (CPU: gloo; default there: tiny model, tiny plan)")
    parallel.add_argument("--single-rank", action=argparse.BooleanOptionalAction, default=None,
                          help="with --parallel: after the parallel runs, rank 0 runs the same plans alone (the "
                               "baseline of the scaling efficiency; default: on unless --baseline-json is given)")
    parallel.add_argument("--baseline-json", type=Path, metavar="FILE",
                          help="with --parallel: single-GPU times from this earlier `bench e2e --json` run "
                               "(same plans, model and dtype) instead of a single-rank run in this launch")
    parallel.add_argument("--collective-timeout", type=float, default=1800.0, metavar="S",
                          help="with --parallel: seconds a collective may wait (the other ranks wait this long "
                               "for rank 0's single-rank run)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if args.parallel is not None:
        from hiflow_fast.parallel import ParallelSpec

        args.parallel = ParallelSpec.parse(args.parallel, "--parallel")
        if args.paths is not None and "official" in comma_list("--paths", args.paths, PATHS):
            raise HiFlowInputError("--paths", args.paths, "ours with --parallel (the official pipeline has no parallel mode)")
        if args.compile:
            raise HiFlowInputError("--compile", True, "off with --parallel (CUDA graphs are not captured across ranks)")
        args.paths = "ours"
        # A CPU smoke run under `torchrun --nproc-per-node 2` finishes in seconds.
        args.model = args.model or ("full" if cuda else "tiny")
        args.plans = args.plans or ("official,2k" if cuda else "tiny")
        args.repeats = args.repeats if args.repeats is not None else 1
        args.single_rank = args.single_rank if args.single_rank is not None else args.baseline_json is None
    else:
        for flag, value in (("--single-rank", args.single_rank), ("--baseline-json", args.baseline_json)):
            if value is not None:
                raise HiFlowInputError(flag, value, "only with --parallel")
    args.paths = args.paths or ",".join(PATHS)
    args.model = args.model or ("full" if cuda else "reduced")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.plans = args.plans or ("official,2k" if cuda else "cpu")
    # CPU: no warm-up run but 3 repeats -- the median discards the cold first run, and the suite
    # stays within its 3-minute budget on 2 busy cores.
    args.repeats = args.repeats if args.repeats is not None else (1 if cuda else 3)
    # Compiling and capturing happen on a path's first call: time the calls after it.
    args.warmup = args.warmup if args.warmup is not None else (1 if args.compile else 0)
    # A CPU runs no JIT: the first call costs what the others do (and the suite's time is short).
    args.prime = args.prime if args.prime is not None else cuda
    for name in ("repeats", "sample_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise HiFlowInputError(f"--{name.replace('_', '-')}", value, "an integer >= 1")
    if args.warmup < 0:
        raise HiFlowInputError("--warmup", args.warmup, "an integer >= 0")
    args.paths = comma_list("--paths", args.paths, PATHS)
    args.plans = parse_plans(args.plans)
    return args


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.parallel is not None:
        from hiflow_fast.bench.e2e_parallel import main_parallel

        return main_parallel(args)
    device, outputs, environment = start(args)
    plans = args.plans
    dtype = DTYPES[args.dtype]
    size = fs.model_size(args.model)
    heading = device_heading(environment, device)
    print(f"e2e on {heading}; model {size.name} ({size.description}), {args.dtype}; {TEXT_NOTE}")

    rate = matmul_rate(device, dtype)
    bandwidth = copy_bandwidth(device)
    print(f"  measured: matmul {rate / 1e12:.2f} TFLOP/s ({args.dtype}), copy {bandwidth / 1e9:.1f} GB/s")
    build_start = time.perf_counter()
    models = build_models(size, device, dtype)
    print(f"  built the models in {time.perf_counter() - build_start:.1f} s ({models.weight_bytes / 2**30:.2f} GiB of transformer weights)")

    primed = prime_paths(plans, models, device, dtype, args) if args.prime else set()

    sections: list[str] = []
    for plan in plans:
        floors = plan_floors(plan, models, rate, bandwidth)
        common = dict(
            model=size.name, dtype=args.dtype, text_tokens=size.text_tokens, plan=plan.name, plan_spec=plan.describe(),
            sample_steps=args.sample_steps, estimated=args.sample_steps is not None and plan.sampled(args.sample_steps) != plan,
            matmul_rate_flops=rate, copy_bandwidth_bytes_per_s=bandwidth, attention=args.attention, backend=args.backend,
            compile=args.compile, warmup_runs=args.warmup, threads=torch.get_num_threads(),
            text_encoding_timed=False, note=TEXT_NOTE,
        )
        plan_records = []
        skip = _fits(plan, models, device, dtype)
        for path in args.paths:
            print(f"  plan {plan.name} ({plan.describe()}) {path} ...", flush=True)
            if skip is None:
                try:
                    summaries = measure_plan(path, plan, models, device, args)
                except Exception as exc:  # out of memory, or a failure: recorded, and the next path runs
                    summaries, skip_reason = None, case_skip_reason(exc)
                else:
                    skip_reason = None
            else:
                summaries, skip_reason = None, skip
            free_device_memory(device)
            if summaries is None:
                print(f"    skipped: {skip_reason}")
                flops, floor_s = floors["total"]
                plan_records.append(make_record(
                    BENCH_NAME, device, path, None, None, environment, skipped=skip_reason, floor_s=floor_s,
                    stage="total", label=f"{plan.name}:total", flops=flops, primed=path in primed, **common,
                ))
                outputs.add(plan_records[-1:])
                continue
            nvml = nvml_snapshot(device)
            for summary in summaries:
                timing, peak = summary.pop("timing"), summary.pop("peak_bytes")
                flops, floor_s = floors[summary["stage"]]
                plan_records.append(make_record(
                    BENCH_NAME, device, path, timing, peak, environment, floor_s=floor_s,
                    label=f"{plan.name}:{summary['stage']}", **summary, peak_kind=PeakMemory.kind_of(device),
                    flops=flops, work=_work(summary), primed=path in primed, **common, nvml_after=nvml,
                ))
                print(f"    {summary['stage']:8s} median {timing.median_s:9.3f} s  (min {timing.min_s:.3f}, "
                      f"max {timing.max_s:.3f}; floor {floor_s:.3f} s)")
            # Each path as soon as it is measured: gpu_check stops a step at its budget.
            outputs.add(plan_records[-len(summaries):])
        _add_speedups(plan_records)
        outputs.add([])  # the speed-ups just set on records already written
        sections.append(markdown_for_plan(plan, plan_records, device, args.sample_steps))
        free_device_memory(device)
    del models
    free_device_memory(device)

    markdown = (
        f"# e2e: the HiFlow cascade, ours vs the official way ({heading})\n\n"
        f"Model: {size.description}, {args.dtype}. Commit {environment.get('commit')}. "
        f"Measured in this run: matmul {rate / 1e12:.2f} TFLOP/s, copy {bandwidth / 1e9:.1f} GB/s. "
        f"Floor = FLOPs / matmul rate + guidance bytes / copy bandwidth. {TEXT_NOTE.capitalize()}.\n\n"
        + "\n".join(sections)
    )
    print()
    print(markdown)
    outputs.finish(markdown, title=f"e2e -- {heading}")
    return outputs.exit_status


def _work(summary: dict[str, Any]) -> str:
    if "size" in summary:
        return f"{summary['size']} x{summary['steps_planned']}"
    return "VAE decode" if summary["stage"] == "decode" else "whole cascade"


def _add_speedups(records: list[dict[str, Any]]) -> None:
    official = {r["stage"]: r["median_s"] for r in records if r["path"] == "official" and r.get("median_s")}
    for r in records:
        if r["path"] == "ours" and r.get("median_s") and r["stage"] in official:
            r["official_over_ours"] = official[r["stage"]] / r["median_s"]


def _fits(plan: Plan, models: Models, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the plan should fit the GPU's free memory, else why it is skipped."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    need = activation_estimate_bytes(plan, models.size, dtype) + MEMORY_MARGIN_BYTES
    if need > free:
        return (f"needs about {need / 2**30:.1f} GiB of activations beside the {models.weight_bytes / 2**30:.1f} GiB "
                f"of weights; {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    return None


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
