"""Peak memory of the whole HiFlow cascade under a memory budget's plan, counted on fake tensors.

    hiflow-fast bench memory --device cpu --budgets 24,16,12,8 --json memory.json

For each budget, the plan of hiflow_fast.memory_plan is applied to a FLUX.1-dev-shaped
transformer and VAE (bf16, random weights: bench/flux_shapes.py) that live in a
`FakeTensorMode` (no memory, no compute), and the peak bytes of the official cascade
1024^2 x 30 -> 2048^2 x 16 -> 4096^2 x 10 are counted phase by phase (bench/fake_memory.py):

* every stage: one denoising step (steps repeat: the same tensors every step), a transformer
  forward on the stage's largest grid (high-res stages: the swin-padded one) through the fast
  path and the block streamer (hiflow_fast.block_streaming), whose streamed block copies are
  counted while they exist, i.e. while they are on the device;
* every stage entry: the previous stage's decode, the bicubic resize and sharpening, and the
  encode (hiflow_fast.vae.guidance_latents), with the plan's VAE tiling;
* the final decode, after the blocks have left the device;
* throughout: the state a stage carries (latents, the previous stage's clean estimates in fp32
  at the indices the stage will read, the previous stage's image).

Each phase's count is added to the bytes of the weights on the device during it: the parameters
outside the blocks, the VAE, and the blocks the streamer holds resident (read from the model's
tensors, not from the planner). Text encoding is excluded. Not seen by a fake-tensor count:
allocator rounding, fragmentation and library workspaces (cuBLAS, attention scratch); the GPU
variant (--device cuda) measures those.

Records (one per budget and plan): budget_gib, plan, exact, counted_peak_gib,
estimated_peak_gib (the planner's), fits (counted <= budget), and the counted peak per phase.
With --lossy, the fp8 plans are recorded as planned only (counted_peak_gib and fits null): the
fake model is not cast to fp8.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from hiflow_fast.bench.common import add_common_arguments, bench_main, make_record, markdown_table, start
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "memory"
GIB = 2**30
# The official cascade at FLUX.1-dev size, and a small one for smoke tests.
CASCADES = {
    "official": ((1024, 1024), 30, ((2048, 2048), (4096, 4096)), (16, 10)),
    "small": ((256, 256), 8, ((512, 512), (1024, 1024)), (4, 3)),
    "smoke": ((128, 128), 4, ((192, 192), (256, 256)), (2, 3)),
    "micro": ((64, 64), 2, ((96, 96), (128, 128)), (1, 1)),
}
# Sharpening sigma of the stage entries (any value: memory does not depend on it).
SIGMA = 1.0


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise HiFlowInputError("--budgets", text, "a comma-separated list of GiB, e.g. 24,16,12,8") from None
    if not budgets or any(not b > 0 for b in budgets):
        raise HiFlowInputError("--budgets", text, "a comma-separated list of positive GiB, e.g. 24,16,12,8")
    return budgets


# ---- the fake models ------------------------------------------------------------------------


def fake_models(model: str, double: int | None = None, single: int | None = None, vae_model: str | None = None):
    """(transformer, vae, text_tokens) of `model` ("full": FLUX.1-dev shapes, "reduced", "tiny"),
    bf16, built inside the caller's FakeTensorMode. double/single override the block counts and
    vae_model the VAE's size (tests use FLUX width with few blocks and a small VAE)."""
    from diffusers import AutoencoderKL

    from hiflow_fast.bench import flux_shapes as fs
    from hiflow_fast.bench.bench_transformer import build_model

    size = fs.model_size(model)
    cfg = size.transformer
    dims = dict(heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"], axes=tuple(cfg["axes_dims_rope"]),
                text=size.text_tokens, joint_dim=cfg["joint_attention_dim"], pooled=cfg["pooled_projection_dim"],
                in_channels=cfg["in_channels"])
    transformer = build_model("cpu", torch.bfloat16, dims, double=double or cfg["num_layers"],
                              single=single if single is not None else cfg["num_single_layers"])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        vae = AutoencoderKL(**fs.model_size(vae_model or model).vae).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(previous)
    return transformer, vae, size.text_tokens


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- counting -------------------------------------------------------------------------------


class CascadeCounter:
    """Counts the phases of one cascade on fake models; VAE phases are counted once and reused
    for every plan (they do not depend on which blocks are resident)."""

    def __init__(self, transformer, vae, text_tokens: int, cascade):
        from hiflow_fast.memory_plan import stage_specs

        self.transformer, self.vae, self.text_tokens = transformer, vae, text_tokens
        base, steps, targets, highres_steps = cascade
        self.specs = stage_specs(base, steps, list(targets), list(highres_steps))
        self._vae_counts: dict[Any, int] = {}
        blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
        block_params = {id(p) for b in blocks for p in b.parameters()}
        self.other_bytes = nbytes(p for p in transformer.parameters() if id(p) not in block_params)
        self.vae_bytes = nbytes(vae.parameters())

    # The state a stage carries while it runs (created inside each counted phase).
    def _carried(self, k: int) -> list[torch.Tensor]:
        spec = self.specs[k]
        h, w = spec.latent_hw
        tokens = (h // 2) * (w // 2)
        state = [torch.empty(1, tokens, 64, dtype=torch.bfloat16)]  # x
        state.append(torch.empty(1, self.text_tokens, self.transformer.config.joint_attention_dim, dtype=torch.bfloat16))
        if k > 0:
            prev = self.specs[k - 1]
            ph, pw = prev.latent_hw
            # The previous stage's clean estimates (fp32) at the indices this stage reads.
            state += [torch.empty(1, (ph // 2) * (pw // 2), 64) for _ in range(spec.steps)]
            state.append(torch.empty(1, 3, prev.height, prev.width, dtype=torch.bfloat16))  # prev_image
            state += [torch.empty(1, tokens, 64) for _ in range(2)]  # guidance state (velocity, x0)
        return state

    def count_vae_phase(self, key, tile: int) -> int:
        """Counted bytes of a stage entry (key = k >= 1) or the final decode (key = "final")."""
        from hiflow_fast import latents as L
        from hiflow_fast import vae as V
        from hiflow_fast.bench.fake_memory import count_peak_bytes

        if (key, tile) in self._vae_counts:
            return self._vae_counts[(key, tile)]
        self.vae.use_tiling = True
        self.vae.tile_sample_min_size = tile
        self.vae.tile_latent_min_size = tile // L.VAE_DOWNSAMPLE
        if key == "final":
            last = self.specs[-1]
            hw = last.latent_hw

            def phase():
                carried = self._carried(len(self.specs) - 1)
                x = torch.empty(1, (hw[0] // 2) * (hw[1] // 2), 64, dtype=torch.bfloat16)
                image = V.decode(self.vae, x, hw)
                return carried, image
        else:
            prev = self.specs[key - 1]
            spec = self.specs[key]
            hw = (prev.height // 8, prev.width // 8) if prev.base else prev.latent_hw

            def phase():
                carried = self._carried(key - 1)
                x = torch.empty(1, (hw[0] // 2) * (hw[1] // 2), 64, dtype=torch.bfloat16)
                return carried, V.guidance_latents(self.vae, x, hw, (spec.height, spec.width), sigma=SIGMA)

        with torch.no_grad():
            counted = count_peak_bytes(phase).peak_bytes
        self._vae_counts[(key, tile)] = counted
        return counted

    def count_step(self, k: int, patch, streamer) -> int:
        """Counted bytes of one step of stage k (forward + carried state), streamed copies included."""
        from hiflow_fast.bench.bench_transformer import model_inputs
        from hiflow_fast.bench.fake_memory import count_peak_bytes

        spec = self.specs[k]
        if spec.base:
            patch.use_base()
        else:
            patch.use_highres(10.0)
        inputs = model_inputs(self.transformer, spec.image_tokens, self.text_tokens, "cpu", torch.bfloat16)

        def phase():
            carried = self._carried(k)
            return carried, self.transformer(**inputs, return_dict=False)[0]

        with torch.no_grad():
            return count_peak_bytes(phase).peak_bytes

    def count_plan(self, plan) -> dict[str, Any]:
        """{phase: bytes on the device at the phase's peak} for one plan, and the peak."""
        from hiflow_fast.block_streaming import BlockStreamer
        from hiflow_fast.fast_transformer import fast_transformer

        phases: dict[str, int] = {}
        fixed = self.other_bytes + self.vae_bytes
        with fast_transformer(self.transformer, kernels="triton") as patch, BlockStreamer(self.transformer) as streamer:
            for k, stage in enumerate(plan.stages):
                streamer.prefetch = max(1, stage.prefetch or 1)
                streamer.set_resident(stage.resident_blocks)
                resident = fixed + streamer.resident_bytes()
                if k > 0:
                    phases[f"stage{k}_entry"] = resident + self.count_vae_phase(k, stage.vae_tile)
                phases[f"stage{k}_step"] = resident + self.count_step(k, patch, streamer)
            streamer.set_resident([])
            phases["final_decode"] = fixed + streamer.resident_bytes() + self.count_vae_phase("final", plan.stages[-1].vae_tile)
        return {"phases": phases, "peak": max(phases.values())}


def shape_of(transformer, text_tokens: int):
    from hiflow_fast.memory_plan import TransformerShape

    return TransformerShape.from_config(dict(transformer.config), text_tokens=text_tokens)


# ---- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", default="24,16,12,8", help="GiB, comma-separated (default 24,16,12,8)")
    parser.add_argument("--model", choices=("full", "reduced", "tiny"), default="full",
                        help="full: FLUX.1-dev shapes (default); reduced/tiny: small shapes for smoke tests")
    parser.add_argument("--cascade", choices=sorted(CASCADES), default=None,
                        help="official: 1024 -> 2048 -> 4096 (default for full), small: 256 -> 512 -> 1024 (default otherwise), "
                             "smoke: 128 -> 192 -> 256, micro: 64 -> 96 -> 128")
    parser.add_argument("--lossy", action="store_true", help="also plan (not count) the LOSSY fp8 plans")
    parser.add_argument("--sample-steps", type=int, default=2, help="GPU: timed steps per stage and budget (default 2)")
    parser.add_argument("--gpu-stages", default="2k,4k", help="GPU: the stages measured, 2k and/or 4k (default both)")
    add_common_arguments(parser)
    return parser


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    if args.device == "cuda":
        from hiflow_fast.bench.memory_gpu import run_gpu

        return run_gpu(args, budgets)
    device, outputs, environment = start(args)
    cascade_name = args.cascade or ("official" if args.model == "full" else "small")
    records = count_budgets(budgets, args.model, CASCADES[cascade_name], environment, lossy=args.lossy,
                            on_record=lambda r: outputs.add([r]))
    rows = [
        {"budget": f"{r['budget_gib']:g} GiB", "plan": r["plan"], "exact": r["exact"],
         "counted": "-" if r["counted_peak_gib"] is None else f"{r['counted_peak_gib']:.2f} GiB",
         "estimated": "-" if r["estimated_peak_gib"] is None else f"{r['estimated_peak_gib']:.2f} GiB",
         "fits": r["fits"], "resident": r.get("resident_blocks_per_stage")}
        for r in records
    ]
    table = markdown_table(rows, [("budget", "budget"), ("plan", "plan"), ("exact", "exact"), ("counted peak", "counted"),
                                  ("estimated peak", "estimated"), ("counted <= budget", "fits"),
                                  ("resident blocks per stage", "resident")])
    print(table)
    title = f"HiFlow cascade {cascade_name} ({args.model} shapes, bf16) under memory budgets, counted on fake tensors (CPU)"
    outputs.finish(f"# {title}\n\nCommit {environment.get('commit')}; no GPU involved.\n\n{table}\n", title=title)
    return outputs.exit_status


def count_budgets(budgets, model: str, cascade, environment: dict[str, Any], *, lossy: bool = False,
                  double: int | None = None, single: int | None = None, vae_model: str | None = None, on_record=None) -> list[dict[str, Any]]:
    """One record per budget (and per lossy plan when asked): counted and estimated peaks."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hiflow_fast.interpreter import prepare_interpreter
    from hiflow_fast.memory_plan import plan_memory

    # The fast path's GPU kernels are what is counted (their fake implementations allocate what
    # the kernels do); on a CPU Triton is switched to its interpreter and never run.
    prepare_interpreter("triton", None)
    records = []
    with FakeTensorMode():
        transformer, vae, text_tokens = fake_models(model, double, single, vae_model)
        counter = CascadeCounter(transformer, vae, text_tokens, cascade)
        shape = shape_of(transformer, text_tokens)
        for gib in budgets:
            for lossy_kind in (None, "fp8") if lossy else (None,):
                started = time.perf_counter()
                try:
                    plan = plan_memory(int(gib * GIB), counter.specs, shape=shape, lossy=lossy_kind,
                                       vae_params=sum(p.numel() for p in vae.parameters()), vae_tile=int(vae.tile_sample_min_size))
                except HiFlowInputError as exc:
                    record = make_record(f"{BENCH_NAME}.cascade_peak_counted", "cpu", f"budget-{gib:g}", None, None,
                                         environment, skipped=f"no plan: {exc}", budget_gib=gib, plan=None, exact=lossy_kind is None,
                                         counted_peak_gib=None, estimated_peak_gib=None, fits=False)
                else:
                    # A lossy plan's fp8 storage is not applied to the fake model: planned only.
                    counted = counter.count_plan(plan) if plan.exact else None
                    record = make_record(
                        f"{BENCH_NAME}.cascade_peak_counted", "cpu", plan.name, None,
                        counted["peak"] if counted else None, environment,
                        budget_gib=gib, plan=plan.name, exact=plan.exact,
                        counted_peak_gib=counted["peak"] / GIB if counted else None,
                        estimated_peak_gib=plan.peak_bytes / GIB,
                        fits=(counted["peak"] <= gib * GIB) if counted else None,
                        counted_phases_gib={k: v / GIB for k, v in counted["phases"].items()} if counted else None,
                        estimated_stage_peaks_gib=[s.peak_bytes / GIB for s in plan.stages] + [plan.final_decode_bytes / GIB],
                        resident_blocks_per_stage=[len(s.resident_blocks) for s in plan.stages],
                        blocks=shape.blocks, cascade=[[s.height, s.width, s.steps] for s in counter.specs],
                        method="fake-tensor count (bench/fake_memory.py), one step per stage", seconds=time.perf_counter() - started,
                    )
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


main = bench_main(_main)
