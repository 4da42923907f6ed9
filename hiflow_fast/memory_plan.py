"""Memory plans: what stays on the device, stage by stage, to run within a memory budget.

Pure arithmetic over the transformer's config shapes (FLUX.1-dev by default, or a model
folder's transformer/config.json read as JSON): nothing is loaded, nothing is allocated.

A plan decides per stage of a HiFlow cascade:

* which transformer blocks stay resident and which are streamed from host memory (as many
  resident as fit; the rest copied `prefetch` blocks ahead of use, hiflow_fast.block_streaming);
* that the text encoders leave the device before the base stage;
* the VAE tiling of every decode and encode (stage entries, final decode);
* the MLP chunk size of the fast path;
* CUDA graphs: off whenever a block is streamed (a captured graph would replay the copies'
  addresses, not the copies).

Exact plans change no arithmetic (the streamed weights are bit-for-bit copies, the VAE tile and
the chunk size are the resident run's), so their latents equal the resident run's. A lossy plan
(`lossy="fp8"`) stores the block weights in float8 and is named and flagged as such.

The estimates are upper bounds by construction: every term is the count of a tensor the run
holds (weights by parameter count, streaming buffers, activations of the fast path as
`bench transformer --count-memory` counts them on fake tensors, plus a margin); `bench memory`
checks them against a fake-tensor count of the whole cascade.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from .errors import HiFlowInputError

GIB = 2**30
# The host link of a consumer card: PCIe 4.0 x16 from pinned memory moves ~25 GB/s in practice.
DEFAULT_HOST_BANDWIDTH = 25e9
# The matmul rate the overhead estimate divides FLOPs by: an RTX 4090's dense bf16 rate with
# fp32 accumulation (~82 TFLOP/s peak), rounded down to what large GEMMs sustain.
DEFAULT_MATMUL_RATE = 70e12
# Blocks copied ahead of the one computing: two keep the link busy while a block of a cheap
# stage computes faster than its copy would arrive.
DEFAULT_PREFETCH = 2
# The fast path's MLP chunk, hiflow_fast.fast_transformer.DEFAULT_CHUNK_TOKENS (a test keeps the
# two equal; not imported, so that planning does not import diffusers). Exact plans keep it: a
# GEMM over a different number of rows may pick another kernel and round differently.
DEFAULT_CHUNK_TOKENS = 8192

_BUDGET_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(gib|gb|mib|mb|g)?\s*$", re.IGNORECASE)
_UNITS = {None: GIB, "g": GIB, "gib": GIB, "gb": 10**9, "mib": 2**20, "mb": 10**6}
BUDGET_ALLOWED = "a size such as 12GiB, 12GB, 512MiB or 12 (GiB), or 'auto' (the free memory of the CUDA device)"


def parse_budget(value: Any, field: str = "memory_budget") -> int:
    """Bytes of a budget: "12GiB", "12GB", "512MiB", "12" or 12 (GiB), or "auto" (the free
    memory of the current CUDA device, torch.cuda.mem_get_info)."""
    if isinstance(value, bool) or value is None:
        raise HiFlowInputError(field, value, BUDGET_ALLOWED)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise HiFlowInputError(field, value, BUDGET_ALLOWED)
        return int(value * GIB)
    if not isinstance(value, str):
        raise HiFlowInputError(field, value, BUDGET_ALLOWED)
    if value.strip().lower() == "auto":
        import torch

        if not torch.cuda.is_available():
            raise HiFlowInputError(field, value, "a size such as 12GiB: 'auto' needs a CUDA device")
        free, _total = torch.cuda.mem_get_info()
        return int(free)
    match = _BUDGET_PATTERN.match(value)
    if match is None:
        raise HiFlowInputError(field, value, BUDGET_ALLOWED)
    number, unit = float(match.group(1)), match.group(2)
    size = int(number * _UNITS[unit.lower() if unit else None])
    if size <= 0:
        raise HiFlowInputError(field, value, BUDGET_ALLOWED)
    return size


# ---- shapes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    """What the planner needs of a Flux transformer config."""

    double_blocks: int = 19
    single_blocks: int = 38
    heads: int = 24
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int | None = None
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    text_tokens: int = 512  # T5's max length in FLUX.1-dev

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @classmethod
    def from_config(cls, config: dict[str, Any], text_tokens: int = 512) -> "TransformerShape":
        try:
            return cls(
                double_blocks=int(config["num_layers"]),
                single_blocks=int(config["num_single_layers"]),
                heads=int(config["num_attention_heads"]),
                head_dim=int(config["attention_head_dim"]),
                in_channels=int(config["in_channels"]),
                out_channels=config.get("out_channels"),
                joint_attention_dim=int(config["joint_attention_dim"]),
                pooled_projection_dim=int(config["pooled_projection_dim"]),
                guidance_embeds=bool(config.get("guidance_embeds", False)),
                text_tokens=text_tokens,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise HiFlowInputError("--model", config.get("_class_name", "config"), f"a Flux transformer config ({exc})") from None

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, text_tokens: int = 512) -> "TransformerShape":
        """Read <model_dir>/transformer/config.json (JSON only, no weights)."""
        path = os.path.join(os.fspath(model_dir), "transformer", "config.json")
        if not os.path.isfile(path):
            raise HiFlowInputError("--model", os.fspath(model_dir), "a diffusers-format Flux folder with transformer/config.json")
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as exc:
            raise HiFlowInputError("--model", path, f"a readable JSON config ({exc})") from None
        return cls.from_config(config, text_tokens)

    # Parameter counts of diffusers' Flux modules (weights + biases), by module:
    def double_block_params(self) -> int:
        """FluxTransformerBlock: two adaLN-Zero (d -> 6d), q/k/v of both streams, two output
        projections, four q/k RMSNorm scales, two 4x MLPs."""
        d, h = self.hidden, self.head_dim
        adaln = 2 * (6 * d * d + 6 * d)
        attention = 6 * (d * d + d) + 2 * (d * d + d) + 4 * h
        mlps = 2 * (4 * d * d + 4 * d + 4 * d * d + d)
        return adaln + attention + mlps

    def single_block_params(self) -> int:
        """FluxSingleTransformerBlock: adaLN (d -> 3d), q/k/v, two RMSNorm scales, d -> 4d MLP,
        and proj_out over the concatenated attention + MLP output (5d -> d)."""
        d, h = self.hidden, self.head_dim
        return (3 * d * d + 3 * d) + 3 * (d * d + d) + 2 * h + (4 * d * d + 4 * d) + (5 * d * d + d)

    def double_block_kept_params(self) -> int:
        """Parameters of a double block that a lossy fp8 plan leaves at full precision: diffusers'
        layerwise casting skips every module whose name contains "norm" (the model's
        `_skip_layerwise_casting_patterns`): the two adaLN-Zero linears and the q/k RMSNorm scales."""
        d, h = self.hidden, self.head_dim
        return 2 * (6 * d * d + 6 * d) + 4 * h

    def single_block_kept_params(self) -> int:
        """As double_block_kept_params, for a single block: its adaLN linear and two RMSNorm scales."""
        d, h = self.hidden, self.head_dim
        return (3 * d * d + 3 * d) + 2 * h

    def block_bytes(self, elem: int, lossy: str | None = None) -> list[int]:
        """Bytes of every block in execution order: all parameters at `elem` bytes, or under a
        lossy fp8 plan one byte each except the ones layerwise casting keeps at `elem`."""
        if lossy is None:
            return [p * elem for p in self.block_params()]
        double = (self.double_block_params() - self.double_block_kept_params()) + self.double_block_kept_params() * elem
        single = (self.single_block_params() - self.single_block_kept_params()) + self.single_block_kept_params() * elem
        return [double] * self.double_blocks + [single] * self.single_blocks

    def other_params(self) -> int:
        """Everything outside the blocks: token and text embedders, timestep / guidance / pooled
        embedders, the output norm and projection."""
        d = self.hidden
        out = self.out_channels or self.in_channels
        embedders = (self.in_channels * d + d) + (self.joint_attention_dim * d + d)
        conditioning = (1 + int(self.guidance_embeds)) * (256 * d + d + d * d + d)
        conditioning += self.pooled_projection_dim * d + d + d * d + d
        return embedders + conditioning + (2 * d * d + 2 * d) + (d * out + out)

    def block_params(self) -> list[int]:
        """Parameters of every block in execution order (double blocks, then single blocks)."""
        return [self.double_block_params()] * self.double_blocks + [self.single_block_params()] * self.single_blocks

    def block_names(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(self.double_blocks)] + [
            f"single_transformer_blocks.{i}" for i in range(self.single_blocks)
        ]

    def total_params(self) -> int:
        return sum(self.block_params()) + self.other_params()


FLUX_DEV = TransformerShape()

# FLUX's VAE (AutoencoderKL, 16 latent channels, blocks 128/256/512/512): 83.8 M parameters,
# and its default tile: 1024 pixels, neighbours overlapping by a quarter.
FLUX_VAE_PARAMS = 83_819_683
FLUX_VAE_TILE = 1024


# ---- activation accounting ----------------------------------------------------------------

# Peak activations of one transformer forward of L joint tokens (image + text), in units of
# the joint hidden state (L x d x element size), as bench/fake_memory.py counts them for the fast
# path (`bench transformer --count-memory`; high-res stages: fused-RoPE processors, the base
# stage: diffusers' processors and RoPE tables). A single block holds the joint input, its
# normalised copy, q, k, v and the attention output (6 units) plus one MLP chunk of `chunk`
# tokens: the 4d-wide MLP activation, the 5d concatenation and the d-wide output (10 d per
# token). Counted at FLUX.1-dev width, bf16 (units incl. the chunk): 14.0 at 1,601 and 4,737
# tokens, 8.78 at 17,153, 7.02 at 66,561 (2.67 GiB); base stage 14.2 at 1,536 tokens. The
# planner uses 6 units (base: 8.5, for diffusers' q/k copies and fp32 RoPE tables) plus the
# chunk, plus a floor for RoPE ids, modulation vectors and text embeddings.
HIGHRES_ACTIVATION_UNITS = 6.25
BASE_ACTIVATION_UNITS = 8.5
CHUNK_UNITS = 10
ACTIVATION_FLOOR = 64 * 2**20

# FLUX VAE peaks (bf16), counted on fake tensors per pixel of one tile and per pixel of the
# whole image (the decoded tiles and the blended result are held at once). Counted: decode
# 1.50 / 1.52 / 1.65 GiB at 1024 / 2048 / 4096 px with 1024-px tiles, 0.38 GiB at 1024 px with
# 512-px tiles; encode 1.25 / 1.25 / 1.27 GiB and 0.31 GiB.
VAE_DECODE_BYTES_PER_TILE_PIXEL = 1600.0
VAE_DECODE_BYTES_PER_IMAGE_PIXEL = 16.0
VAE_ENCODE_BYTES_PER_TILE_PIXEL = 1350.0
VAE_ENCODE_BYTES_PER_IMAGE_PIXEL = 4.0
# Latents, clean estimates kept for the next stage (fp32), velocity state and the text
# embeddings, carried through a stage: per pixel of the stage's image.
STATE_BYTES_PER_PIXEL = 12.0


def transformer_activation_bytes(shape: TransformerShape, image_tokens: int, elem: int, base: bool, chunk: int | None) -> int:
    tokens = image_tokens + shape.text_tokens
    unit = tokens * shape.hidden * elem
    units = BASE_ACTIVATION_UNITS if base else HIGHRES_ACTIVATION_UNITS
    chunk_rows = min(chunk or tokens, tokens)
    return int(units * unit + CHUNK_UNITS * chunk_rows * shape.hidden * elem + ACTIVATION_FLOOR)


def vae_bytes(op: str, height: int, width: int, tile: int | None) -> int:
    """Estimated peak bytes of one FLUX VAE decode or encode of a height x width image with
    diffusers' tiling at `tile` pixels (None: untiled)."""
    per_tile, per_image = (
        (VAE_DECODE_BYTES_PER_TILE_PIXEL, VAE_DECODE_BYTES_PER_IMAGE_PIXEL)
        if op == "decode"
        else (VAE_ENCODE_BYTES_PER_TILE_PIXEL, VAE_ENCODE_BYTES_PER_IMAGE_PIXEL)
    )
    tile_h, tile_w = (height, width) if tile is None else (min(tile, height), min(tile, width))
    return int(per_tile * tile_h * tile_w + per_image * height * width)


def step_flops(shape: TransformerShape, image_tokens: int) -> float:
    """The blocks' matmul FLOPs of one forward: blocks x (24 d^2 L + 4 d L^2)."""
    d, length = shape.hidden, image_tokens + shape.text_tokens
    return shape.blocks * (24.0 * d * d * length + 4.0 * d * length * length)


# ---- plans --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One stage of the cascade: its image size, steps, and whether it is the base stage."""

    height: int
    width: int
    steps: int
    base: bool

    @property
    def latent_hw(self) -> tuple[int, int]:
        h, w = self.height // 8, self.width // 8
        # High-res stages alternate with a grid padded by one latent pixel per side (swin).
        return (h, w) if self.base else (h + 2, w + 2)

    @property
    def image_tokens(self) -> int:
        h, w = self.latent_hw
        return (h // 2) * (w // 2)


@dataclass
class StagePlan:
    stage: int
    height: int
    width: int
    steps: int
    resident_blocks: list[int]  # indices in execution order (double blocks first)
    streamed_blocks: list[int]
    prefetch: int
    weight_dtype: str
    chunk_tokens: int | None
    cuda_graphs: bool
    vae_tiling: bool
    vae_tile: int
    entry_vae: str  # the VAE work before this stage ("none" for the base stage)
    peak_bytes: int
    breakdown: dict[str, int]
    streamed_bytes_per_step: int
    stream_seconds_per_step: float
    compute_seconds_per_step: float

    @property
    def overhead(self) -> float:
        """Estimated step time over the compute time, minus 1: the part of the copies that the
        compute does not hide (copies overlap compute block by block)."""
        if self.compute_seconds_per_step <= 0:
            return 0.0
        return max(0.0, self.stream_seconds_per_step - self.compute_seconds_per_step) / self.compute_seconds_per_step


@dataclass
class MemoryPlan:
    name: str  # "exact-bf16" / "lossy-fp8"
    exact: bool
    budget_bytes: int
    offload_text_encoders: bool
    stages: list[StagePlan]
    final_decode_bytes: int
    block_names: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max([s.peak_bytes for s in self.stages] + [self.final_decode_bytes])

    @property
    def streams(self) -> bool:
        return any(s.streamed_blocks for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["peak_bytes"] = self.peak_bytes
        for stage, plan in zip(out["stages"], self.stages):
            stage["overhead"] = plan.overhead
        return out


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def stage_specs(size: tuple[int, int], steps: int, targets: Sequence[tuple[int, int]], highres_steps: Sequence[int]) -> list[StageSpec]:
    specs = [StageSpec(size[0], size[1], steps, True)]
    specs += [StageSpec(h, w, s, False) for (h, w), s in zip(targets, highres_steps)]
    return specs


OFFICIAL_STAGES = stage_specs((1024, 1024), 30, [(2048, 2048), (4096, 4096)], [16, 10])


def plan_memory(
    budget: int | str,
    stages: Sequence[StageSpec] = OFFICIAL_STAGES,
    *,
    shape: TransformerShape = FLUX_DEV,
    dtype: str = "bfloat16",
    lossy: str | None = None,
    prefetch: int = DEFAULT_PREFETCH,
    vae_params: int = FLUX_VAE_PARAMS,
    vae_tile: int = FLUX_VAE_TILE,
    host_bandwidth: float = DEFAULT_HOST_BANDWIDTH,
    matmul_rate: float = DEFAULT_MATMUL_RATE,
    field: str = "memory_budget",
) -> MemoryPlan:
    """The plan for `stages` within `budget` (bytes, or a string for `parse_budget`).

    Per stage: every block resident if that fits, else the longest prefix of blocks (in
    one of two orders, see below) that fits beside `prefetch` + 1 streaming buffers of the largest streamed
    block, the activations and the VAE work. Raises HiFlowInputError naming `field` when even
    streaming every block does not fit, with the minimum budget of this stage plan."""
    shown = budget
    budget_bytes = parse_budget(budget, field) if not isinstance(budget, int) or isinstance(budget, bool) else budget
    if isinstance(budget, int) and not isinstance(budget, bool) and budget <= 0:
        raise HiFlowInputError(field, budget, BUDGET_ALLOWED)
    if lossy not in (None, "fp8"):
        raise HiFlowInputError("lossy", lossy, "None (exact) or 'fp8' (weights stored in float8_e4m3fn: lossy)")
    if dtype not in DTYPE_BYTES or dtype == "float8_e4m3fn":
        raise HiFlowInputError("dtype", dtype, "bfloat16, float16 or float32")
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 1 <= prefetch <= 4:
        raise HiFlowInputError("prefetch", prefetch, "1 to 4 blocks")
    elem = DTYPE_BYTES[dtype]
    block_bytes = shape.block_bytes(elem, lossy)
    fixed = shape.other_params() * elem + vae_params * elem

    plans: list[StagePlan] = []
    minimum = 0
    for k, spec in enumerate(stages):
        act = transformer_activation_bytes(shape, spec.image_tokens, elem, spec.base, DEFAULT_CHUNK_TOKENS)
        state = int(STATE_BYTES_PER_PIXEL * spec.height * spec.width)
        entry = 0
        entry_vae = "none"
        if k > 0:
            prev = stages[k - 1]
            # The decode ends before the encode starts; the previous stage's image is held while
            # the new one is resized, sharpened and encoded (3 channels, up to fp32).
            entry = max(vae_bytes("decode", prev.height, prev.width, vae_tile), vae_bytes("encode", spec.height, spec.width, vae_tile))
            entry += 4 * 3 * (prev.height * prev.width + 2 * spec.height * spec.width)
            entry_vae = f"decode {prev.height}x{prev.width} + encode {spec.height}x{spec.width}, tiles {vae_tile}px"
        work = max(act, entry)

        def peak_with(resident: list[int]) -> tuple[int, dict[str, int]]:
            streamed = [b for i, b in enumerate(block_bytes) if i not in resident]
            buffers = (min(prefetch + 1, len(streamed)) * max(streamed)) if streamed else 0
            parts = {
                "fixed_weights": fixed,
                "resident_blocks": sum(block_bytes[i] for i in resident),
                "streaming_buffers": buffers,
                "activations_or_vae": work,
                "state": state,
            }
            return sum(parts.values()), parts

        # Two residency orders: double blocks first (the streamed tail is single blocks, whose
        # buffers are 2.4x smaller), or single blocks first (once double blocks must stream
        # anyway, the finer single blocks fill the budget better). The one keeping more bytes
        # resident wins.
        doubles = list(range(shape.double_blocks))
        singles = list(range(shape.double_blocks, shape.blocks))
        best: list[int] | None = None
        smallest = None
        for order in (doubles + singles, singles + doubles):
            for count in range(len(order), -1, -1):
                candidate = sorted(order[:count])
                candidate_peak = peak_with(candidate)[0]
                smallest = candidate_peak if smallest is None else min(smallest, candidate_peak)
                if candidate_peak <= budget_bytes:
                    if best is None or sum(block_bytes[i] for i in candidate) > sum(block_bytes[i] for i in best):
                        best = candidate
                    break
        # The stage's smallest peak over every plan considered (with few blocks, streaming them
        # all can need more than keeping them: prefetch + 1 buffers of the largest block).
        minimum = max(minimum, smallest)
        resident_set = best if best is not None else []
        peak, parts = peak_with(resident_set)
        streamed_list = [i for i in range(shape.blocks) if i not in resident_set]
        streamed_bytes = sum(block_bytes[i] for i in streamed_list)
        plans.append(
            StagePlan(
                stage=k,
                height=spec.height,
                width=spec.width,
                steps=spec.steps,
                resident_blocks=resident_set,
                streamed_blocks=streamed_list,
                prefetch=prefetch if streamed_list else 0,
                weight_dtype="float8_e4m3fn" if lossy == "fp8" else dtype,
                chunk_tokens=DEFAULT_CHUNK_TOKENS,
                cuda_graphs=not streamed_list,
                vae_tiling=k > 0,
                vae_tile=vae_tile,
                entry_vae=entry_vae,
                peak_bytes=peak,
                breakdown=parts,
                streamed_bytes_per_step=streamed_bytes,
                stream_seconds_per_step=streamed_bytes / host_bandwidth,
                compute_seconds_per_step=step_flops(shape, spec.image_tokens) / matmul_rate,
            )
        )
    last = stages[-1]
    # The final decode runs after the transformer's blocks have left the device.
    final = fixed + vae_bytes("decode", last.height, last.width, vae_tile) + int(STATE_BYTES_PER_PIXEL * last.height * last.width)
    minimum = max(minimum, final)
    if minimum > budget_bytes:
        raise HiFlowInputError(
            field,
            shown,
            f"at least {minimum / GIB:.2f} GiB for this stage plan ({_describe(stages)}, {dtype}"
            f"{', fp8 weights' if lossy else ''}): the smallest plan streams every block",
        )
    return MemoryPlan(
        name="lossy-fp8" if lossy == "fp8" else f"exact-{dtype}",
        exact=lossy is None,
        budget_bytes=budget_bytes,
        offload_text_encoders=True,
        stages=plans,
        final_decode_bytes=final,
        block_names=shape.block_names(),
    )


def minimum_budget(stages: Sequence[StageSpec] = OFFICIAL_STAGES, **kwargs) -> int:
    """The smallest budget `plan_memory` accepts for `stages` (every block streamed)."""
    try:
        plan_memory(1 << 50, stages, **kwargs)
    except HiFlowInputError:
        raise
    low, high = 1, 1 << 50
    while low < high:
        mid = (low + high) // 2
        try:
            plan_memory(mid, stages, **kwargs)
            high = mid
        except HiFlowInputError:
            low = mid + 1
    return low


def _describe(stages: Sequence[StageSpec]) -> str:
    return " -> ".join(f"{s.height}x{s.width}x{s.steps}" for s in stages)


def format_plan(plan: MemoryPlan) -> str:
    """The plan as text, one paragraph per stage."""
    lines = [
        f"memory plan {plan.name} ({'exact: same latents as the resident run' if plan.exact else 'LOSSY: fp8 weights, a different image'}), "
        f"budget {plan.budget_bytes / GIB:.2f} GiB, estimated peak {plan.peak_bytes / GIB:.2f} GiB",
        "text encoders: run first, then moved off the device before the base stage" if plan.offload_text_encoders else "",
    ]
    blocks = len(plan.block_names)
    for s in plan.stages:
        label = "base stage" if s.stage == 0 else f"stage {s.stage}"
        lines.append(f"{label} {s.height}x{s.width}, {s.steps} steps:")
        lines.append(
            f"  blocks: {len(s.resident_blocks)}/{blocks} resident ({s.weight_dtype}), {len(s.streamed_blocks)} streamed"
            + (f" {s.prefetch} ahead from pinned host memory" if s.streamed_blocks else "")
        )
        if s.entry_vae != "none":
            lines.append(f"  entry VAE: {s.entry_vae}")
        lines.append(f"  MLP chunk: {s.chunk_tokens} tokens; CUDA graphs: {'allowed' if s.cuda_graphs else 'off (streaming)'}")
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in s.breakdown.items())
        lines.append(f"  estimated peak {s.peak_bytes / GIB:.2f} GiB ({parts} GiB)")
        lines.append(
            f"  streaming: {s.streamed_bytes_per_step / 1e9:.2f} GB/step = {s.stream_seconds_per_step:.2f} s at the host link "
            f"vs {s.compute_seconds_per_step:.2f} s of matmuls: overhead {100 * s.overhead:.0f}%"
        )
    lines.append(f"final decode {plan.stages[-1].height}x{plan.stages[-1].width} (tiles {plan.stages[-1].vae_tile}px, "
                 f"blocks off the device): estimated peak {plan.final_decode_bytes / GIB:.2f} GiB")
    return "\n".join(line for line in lines if line)


LOSSY_CHOICES = ("fp8",)
LOSSY_ALLOWED = "None (exact), or 'fp8': LOSSY, block weights stored in float8_e4m3fn (diffusers' layerwise casting)"


def check_lossy(lossy, memory_budget, compile: bool, *, lossy_field: str = "lossy", budget_field: str = "memory_budget",
                compile_field: str = "compile") -> None:
    """A lossy request checked before any work: a known kind, made with a budget (a lossy plan is
    a memory plan: the budget decides which fp8 blocks stay resident), and not with compile
    (layerwise casting swaps each layer's weights on every forward, through diffusers hooks that
    a captured CUDA graph would not replay)."""
    if lossy is None:
        return
    if not isinstance(lossy, str) or lossy not in LOSSY_CHOICES:
        raise HiFlowInputError(lossy_field, lossy, LOSSY_ALLOWED)
    if memory_budget is None:
        raise HiFlowInputError(lossy_field, lossy, f"only together with {budget_field} (a lossy plan is a memory plan: the budget decides which fp8 blocks stay resident)")
    if compile:
        raise HiFlowInputError(compile_field, True, f"off with {lossy_field}={lossy!r}: layerwise casting hooks run on every forward, "
                               "which a captured CUDA graph would not replay")


def check_budget_without_weights(memory_budget, transformer_config: dict, config, dtype: str, *, compile: bool = False,
                                 field: str = "memory_budget", lossy: str | None = None) -> None:
    """What plan_for_call checks, from the transformer's config.json alone, before any weight is
    read: the budget's form, that some plan fits it, and that it does not stream under compile.
    The VAE counts as 0 bytes here (its size is known once it is loaded), so a budget just above
    this minimum can still be refused by plan_for_call -- before the first step."""
    cli = field.startswith("--")
    check_lossy(lossy, memory_budget, compile, lossy_field="--lossy" if cli else "lossy", budget_field=field,
                compile_field="--compile" if cli else "compile")
    if memory_budget is None:
        return
    shape = TransformerShape.from_config(transformer_config, text_tokens=int(config.max_sequence_length))
    stages = [StageSpec(config.height, config.width, config.num_inference_steps, True)]
    stages += [StageSpec(s.height, s.width, s.steps, False) for s in config.stages]
    plan = plan_memory(memory_budget, stages, shape=shape, dtype=dtype, vae_params=0, field=field, lossy=lossy)
    if compile and plan.streams:
        raise HiFlowInputError("--compile" if cli else "compile", True,
                               f"off with {field}={memory_budget!r}: its plan streams blocks, which CUDA graphs cannot replay")


def plan_for_call(pipe, config, memory_budget, *, compile: bool = False, lossy: str | None = None):
    """The memory session of one pipeline call: the plan for `config`'s stages on `pipe`'s
    transformer (shapes read from its config; nothing allocated), or no plan when there is no
    budget. A pipeline loaded with a budget (`from_pretrained(memory_budget=...)`, its blocks in
    host memory) always runs under a plan: its own budget unless the call gives one. `lossy`:
    None (exact), or "fp8" (LOSSY, needs a budget). Raises HiFlowInputError before any work for
    a bad budget or lossy request."""
    from .block_streaming import MemorySession

    placement = getattr(pipe, "placement", None)
    if memory_budget is None and placement is not None:
        memory_budget = placement.memory_budget
    check_lossy(lossy, memory_budget, compile)
    if memory_budget is None:
        return MemorySession(pipe, None)
    budget = parse_budget(memory_budget)
    cfg = dict(pipe.transformer.config)
    shape = TransformerShape.from_config(cfg, text_tokens=int(config.max_sequence_length))
    dtype = str(pipe.dtype).replace("torch.", "")
    if dtype not in DTYPE_BYTES:
        raise HiFlowInputError("memory_budget", memory_budget, f"a transformer in bfloat16, float16 or float32 (it is {dtype})")
    stages = [StageSpec(config.height, config.width, config.num_inference_steps, True)]
    stages += [StageSpec(s.height, s.width, s.steps, False) for s in config.stages]
    vae_params = sum(p.numel() for p in pipe.vae.parameters())
    tile = getattr(pipe.vae, "tile_sample_min_size", FLUX_VAE_TILE)
    tile = int(tile[0] if isinstance(tile, (list, tuple)) else tile)
    plan = plan_memory(budget, stages, shape=shape, dtype=dtype, lossy=lossy, vae_params=vae_params, vae_tile=tile)
    if compile and plan.streams:
        raise HiFlowInputError(
            "compile", True, f"False with memory_budget={memory_budget!r}: its plan streams blocks, which CUDA graphs cannot replay"
        )
    if lossy is not None:
        from .lossy_weights import check_blocks_unhooked

        check_blocks_unhooked(pipe.transformer)
    return MemorySession(pipe, plan)
