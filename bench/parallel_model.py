"""A scaling model of HiFlow under context parallelism -- a model, not a measurement.

What one high-res stage would take on N GPUs that split the transformer's sequence (diffusers'
Ulysses, ring, or both; hiflow_fast.parallel), predicted from single-GPU numbers:

    stage(N) = entry x share(N) + entry tiles' bytes / link bandwidth
               + sum over the stage's steps of
               (transformer(step) / N + guidance(step) + communication(step) / link bandwidth
                + collectives(step) x latency)

* entry (the VAE round trip and the re-noising): its tiled decode and encode are split across
  the ranks tile by tile, round robin (hiflow_fast.parallel: ParallelRun.split_vae_tiles), so
  it shrinks to the busiest rank's share of the tiles' work (`entry_share`, by pixels; the last
  tiles of a row are smaller, and 9 or 36 tiles do not divide by every N), plus the tiles the other ranks
  computed, received over the link (`entry_bytes`); the re-noising and resampling are counted
  in the entry as split too (they are a small part of it);
* the guidance step is REPLICATED: every rank runs it whole on the replicated latents, so it
  does not shrink with N;
* the transformer's work divides by N: every matmul runs on 1/N of the tokens, and attention
  (Ulysses: all tokens, 1/N of the heads; ring: 1/N of the queries against all keys) on 1/N of
  the L^2 work. What this leaves out: GEMMs on fewer rows reach a lower fraction of peak (at 4K
  on 8 GPUs each rank still holds ~8,300 tokens, a large GEMM), and each rank still reads all
  the weights once a step (24 GB at ~3 TB/s: ~8 ms against ~0.7 s of compute);
* communication is NOT overlapped with compute: diffusers issues its all-to-alls and ring
  all-gathers and waits for them before the attention they feed (`overlapped_s` gives the other
  bound, max(compute, communication) per step, for what a pipelined engine could reach);
* communication time = the bytes the busiest rank sends or receives per step (whichever is
  larger) over the link's per-direction bandwidth; on an NVSwitch node every GPU can send and
  receive at that rate at once. `comm_per_step` counts them from the shapes exactly as
  diffusers 0.42.1 moves them (see its docstring).

Inputs are MEASURED when a JSON of a single-GPU GPU run is given (`bench e2e` records, or a
`bench/gpu_check` gpu_check.json holding them): the stage's entry seconds and per-step seconds of
`ours`, the guidance step from `bench guidance` (fused path) when that JSON holds it (else its
bytes over the run's measured copy bandwidth). Without such a JSON every input is ASSUMED: FLOPs
(bench/flux_shapes.py) at the stated H100 rates below, and every output says "assumed".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from hiflow_fast.errors import HiFlowInputError

MODEL_LABEL = "model, not a measurement"


# ---- interconnects (published per-GPU bandwidths) --------------------------------------------


@dataclass(frozen=True)
class Link:
    """An interconnect: bytes per second one GPU can send (and, at the same time, receive)."""

    name: str
    bytes_per_s: float  # per GPU, per direction
    source: str


LINKS: dict[str, Link] = {
    link_id: link
    for link_id, link in (
        ("nvlink4", Link("H100 SXM, NVLink 4 (NVSwitch)", 450e9,
                         "NVIDIA H100 Tensor Core GPU datasheet: NVLink 900 GB/s per GPU, bidirectional -> 450 GB/s each way")),
        ("nvlink3", Link("A100 SXM, NVLink 3 (NVSwitch)", 300e9,
                         "NVIDIA A100 Tensor Core GPU datasheet: NVLink 600 GB/s per GPU, bidirectional -> 300 GB/s each way")),
        ("pcie5", Link("PCIe gen5 x16", 50e9,
                       "PCI-SIG PCIe 5.0: 32 GT/s x 16 lanes = 63 GB/s raw each way; ~50 GB/s effective")),
        ("pcie4", Link("PCIe gen4 x16", 25e9,
                       "PCI-SIG PCIe 4.0: 16 GT/s x 16 lanes = 31.5 GB/s raw each way; ~25 GB/s effective")),
    )
}

# ---- assumed rates (used only where no measurement is given; outputs say "assumed") ----------

H100_BF16_DENSE_PEAK_FLOPS = 989e12  # NVIDIA H100 SXM datasheet, dense bf16 Tensor Core
# Large bf16 GEMMs (FLUX's 3072-wide projections over thousands of tokens) reach ~70 % of peak.
ASSUMED_MATMUL_FLOPS = 0.7 * H100_BF16_DENSE_PEAK_FLOPS
# The VAE's convolutions, group norms and attention run well below matmul peak; assumed 35 %.
ASSUMED_VAE_FLOPS = 0.35 * H100_BF16_DENSE_PEAK_FLOPS
H100_HBM_BYTES_PER_S = 3.35e12  # NVIDIA H100 SXM datasheet, HBM3
# What a streaming copy reaches of it (the guidance step is bandwidth-bound); assumed 80 %.
ASSUMED_COPY_BYTES_PER_S = 0.8 * H100_HBM_BYTES_PER_S
# Fixed cost of one collective call (launch and synchronisation; small messages in an NVSwitch
# node take ~10-30 us with NCCL); assumed 25 us. It matters only when collectives are tiny.
ASSUMED_COLLECTIVE_LATENCY_S = 25e-6


# ---- communication volume --------------------------------------------------------------------


def split_sizes(total: int, parts: int) -> list[int]:
    """torch.tensor_split's sizes: the first `total % parts` parts one larger."""
    return [total // parts + (1 if r < total % parts else 0) for r in range(parts)]


@dataclass
class CommVolume:
    """Bytes one transformer step moves between ranks (one forward, batch included)."""

    sent: list[int]  # per rank
    received: list[int]  # per rank
    by_kind: dict[str, int]  # total bytes sent, per kind of collective
    collectives: int  # collective calls per rank (data-carrying ones)
    size_exchanges: int  # diffusers' small host all-gathers of the local lengths (any-length modes)

    @property
    def total(self) -> int:
        return sum(self.sent)

    @property
    def critical(self) -> int:
        """What the busiest rank sends or receives, whichever is larger: it sets the time."""
        return max(max(s, r) for s, r in zip(self.sent, self.received))


def comm_per_step(ulysses: int, ring: int, image_tokens: int, text_tokens: int, transformer: dict[str, Any],
                  dtype_bytes: int, batch: int = 1) -> CommVolume:
    """Bytes moved by one transformer forward under context parallelism, as diffusers 0.42.1
    and hiflow_fast.parallel move them.

    Ranks r = ring_index x ulysses + ulysses_index (diffusers' (ring, ulysses) mesh). Rank r holds
    its tensor_split share of the text tokens and of the image tokens, s_r joint tokens. Per
    attention layer (19 double + 38 single blocks for FLUX; one joint attention each):

    * Ulysses (degree U > 1), within each group of U consecutive ranks holding S_g tokens: the
      heads, padded to a multiple of U, split into h = ceil(H / U) per rank. q, k and v: each an
      all-to-all in which rank r sends its s_r tokens x h heads x D to each of the U - 1 others
      (and receives S_g - s_r tokens x h). The output: the reverse (sends S_g - s_r tokens x h,
      receives (U - 1) s_r x h).
    * Ring (degree R > 1), within each group of R ranks with the same Ulysses index: k and v
      (S_g tokens, or s_r without Ulysses; that rank's heads: h, less the padding on the group's
      last Ulysses rank, or all H without Ulysses), padded to the longest in the group, are
      all-gathered: each rank sends its chunk to the R - 1 others and receives theirs.
    * After the last block: proj_out's image tokens (patch^2 x channels = 64 features),
      each rank's share padded to the largest, all-gathered over all P ranks
      (hiflow_fast.parallel._ImageGatherHook).

    All in the model dtype (`dtype_bytes`). The small host all-gathers of lengths that the
    any-length modes run before each collective are counted in `size_exchanges`, not in bytes."""
    if ulysses < 1 or ring < 1 or ulysses * ring < 2:
        raise ValueError(f"ulysses={ulysses}, ring={ring}: degrees >= 1 with a product >= 2")
    world = ulysses * ring
    heads, head_dim = transformer["num_attention_heads"], transformer["attention_head_dim"]
    layers = transformer["num_layers"] + transformer["num_single_layers"]
    out_features = transformer["patch_size"] ** 2 * (transformer.get("out_channels") or transformer["in_channels"])
    unit = dtype_bytes * batch * head_dim  # bytes of one token x one head
    image, text = split_sizes(image_tokens, world), split_sizes(text_tokens, world)
    local = [i + t for i, t in zip(image, text)]
    sent, received = [0] * world, [0] * world
    kinds = {"ulysses_all_to_all": 0, "ring_all_gather": 0, "proj_out_all_gather": 0}
    collectives = size_exchanges = 0

    def ulysses_group(r: int) -> list[int]:
        first = r // ulysses * ulysses
        return list(range(first, first + ulysses))

    heads_pad = (-heads) % ulysses
    heads_local = (heads + heads_pad) // ulysses
    if ulysses > 1:
        collectives += 4 * layers
        size_exchanges += 4 * layers  # q, k, v: their output lengths; out: its input lengths
        for r in range(world):
            group_tokens = sum(local[j] for j in ulysses_group(r))
            qkv_sent = 3 * local[r] * (ulysses - 1) * heads_local
            qkv_received = 3 * (group_tokens - local[r]) * heads_local
            out_sent, out_received = (group_tokens - local[r]) * heads_local, (ulysses - 1) * local[r] * heads_local
            sent[r] += layers * (qkv_sent + out_sent) * unit
            received[r] += layers * (qkv_received + out_received) * unit
            kinds["ulysses_all_to_all"] += layers * (qkv_sent + out_sent) * unit
    if ring > 1:
        collectives += layers
        size_exchanges += layers  # ring-anything gathers the k/v lengths first
        for r in range(world):
            u = r % ulysses
            members = [g * ulysses + u for g in range(ring)]
            lengths = [sum(local[j] for j in ulysses_group(m)) for m in members]
            rank_heads = heads if ulysses == 1 else heads_local - (heads_pad if u == ulysses - 1 else 0)
            chunk = 2 * max(lengths) * rank_heads * unit  # k and v, padded to the group's longest
            sent[r] += layers * (ring - 1) * chunk
            received[r] += layers * (ring - 1) * chunk
            kinds["ring_all_gather"] += layers * (ring - 1) * chunk
    gather_chunk = max(image) * out_features * dtype_bytes * batch
    collectives += 1
    for r in range(world):
        sent[r] += (world - 1) * gather_chunk
        received[r] += (world - 1) * gather_chunk
        kinds["proj_out_all_gather"] += (world - 1) * gather_chunk
    return CommVolume(sent, received, kinds, collectives, size_exchanges)


# ---- stages and their inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class StageSpec:
    """One high-res stage of the official plan: its size, steps and the previous stage's size."""

    name: str
    height: int
    width: int
    steps: int
    previous: tuple[int, int]

    @property
    def size(self) -> str:
        return f"{self.height}x{self.width}"


# The official plan's high-res stages (bench_e2e.PLANS["official"]: 1024x30 -> 2048x16 -> 4096x10).
STAGES: dict[str, StageSpec] = {
    "4k": StageSpec("4k", 4096, 4096, 10, (2048, 2048)),
    "2k": StageSpec("2k", 2048, 2048, 16, (1024, 1024)),
}


def step_grids(stage: StageSpec, swin: bool = True) -> list[tuple[int, int]]:
    """The latent grid of each step (even steps swin-padded by 2; as bench_e2e._step_grids)."""
    h, w = stage.height // 8, stage.width // 8
    return [((h + 2, w + 2) if swin and i % 2 == 0 else (h, w)) for i in range(stage.steps)]


def image_tokens(grid: tuple[int, int]) -> int:
    return (grid[0] // 2) * (grid[1] // 2)


@dataclass
class StageInputs:
    """Single-GPU seconds of one stage, each with where it came from."""

    stage: StageSpec
    entry_s: float  # VAE round trip + re-noising, on one GPU
    transformer_step_s: float  # one transformer forward, averaged over the stage's swin grids
    guidance_step_s: float  # one guidance step (replicated)
    sources: dict[str, str] = field(default_factory=dict)  # input -> "measured: ..." / "assumed: ..."
    device_name: str | None = None

    @property
    def measured(self) -> bool:
        return all(source.startswith("measured") for source in self.sources.values())

    @property
    def single_s(self) -> float:
        return self.entry_s + self.stage.steps * (self.transformer_step_s + self.guidance_step_s)


@dataclass
class Prediction:
    """The model's stage time on N GPUs against one."""

    stage: str
    mode: str
    ulysses: int
    ring: int
    link_name: str
    single_s: float
    parallel_s: float  # communication not overlapped (diffusers' way)
    overlapped_s: float  # the bound with communication fully hidden behind compute
    comm_bytes_per_step_rank: float  # busiest rank, mean over the stage's steps
    comm_bytes_per_step_total: float
    comm_s_per_step: float
    compute_s_per_step: float  # transformer / N
    outside_transformer_s: float  # entry (split by tiles, received tiles included) + guidance steps (replicated)

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def speedup(self) -> float:
        return self.single_s / self.parallel_s

    @property
    def efficiency(self) -> float:
        return self.speedup / self.world_size

    @property
    def overlapped_speedup(self) -> float:
        return self.single_s / self.overlapped_s


def degrees(mode: str, gpus: int) -> tuple[int, int]:
    """(ulysses, ring) of a mode on `gpus` GPUs; 'both': the most even split, Ulysses the larger."""
    if mode == "ulysses":
        return gpus, 1
    if mode == "ring":
        return 1, gpus
    if mode == "both":
        ring = max(d for d in range(1, int(gpus ** 0.5) + 1) if gpus % d == 0)
        if ring == 1:
            raise HiFlowInputError("--gpus", gpus, "a GPU count with a factor > 1 for mode 'both' (4, 6, 8, ...)")
        return gpus // ring, ring
    raise HiFlowInputError("--modes", mode, "ulysses, ring or both")


def entry_share(tile_work: Iterable[list[float]], world: int) -> float:
    """The busiest rank's fraction of a stage entry's VAE work when every tiled pass (each a
    list of per-tile work in diffusers' loop order) hands tile k to rank k mod `world`."""
    passes = [list(p) for p in tile_work]
    total = sum(sum(p) for p in passes)
    busiest = max(sum(f for p in passes for k, f in enumerate(p) if k % world == rank) for rank in range(world))
    return busiest / total


def entry_tiles(stage: StageSpec, vae: dict[str, Any]) -> list[list[float]]:
    """The work of each tile of a stage's entry, in pixels: the tiled decode of the previous
    stage's latents, the tiled encode of this stage's image (FLUX's VAE config). Pixels stand in
    for FLOPs (counting them takes seconds, too long for gpu_check's step): the convolutions
    scale with them; only the smaller edge tiles are weighted a little high, as a tile's
    mid-block attention grows faster than its pixels."""
    from hiflow_fast.bench import flux_shapes as fs

    return [[h * w for h, w in fs.vae_tiles(vae, op, height, width)]
            for op, (height, width) in (("decode", stage.previous), ("encode", (stage.height, stage.width)))]


def entry_bytes(stage: StageSpec, vae: dict[str, Any], world: int, dtype_bytes: int) -> float:
    """Bytes the busiest rank receives at a stage entry: every tile output it did not compute
    (decoded tiles: 3 x pixels; encoded tiles: the 2 x latent-channel moments at 1/8 the side)."""
    from hiflow_fast.bench import flux_shapes as fs

    down = 2 ** (len(vae["block_out_channels"]) - 1)
    outputs = [[vae["out_channels"] * h * w for h, w in fs.vae_tiles(vae, "decode", *stage.previous)],
               [2 * vae["latent_channels"] * (h // down) * (w // down) for h, w in fs.vae_tiles(vae, "encode", stage.height, stage.width)]]
    total = sum(sum(p) for p in outputs)
    least_own = min(sum(n for p in outputs for k, n in enumerate(p) if k % world == rank) for rank in range(world))
    return (total - least_own) * dtype_bytes


def predict(inputs: StageInputs, ulysses: int, ring: int, link: Link, transformer: dict[str, Any], text_tokens: int,
            dtype_bytes: int, latency_s: float = ASSUMED_COLLECTIVE_LATENCY_S, *, entry_share: float = 1.0,
            entry_bytes: float = 0.0) -> Prediction:
    """The stage on ulysses x ring GPUs over `link` (see the module docstring for the formula);
    entry_share / entry_bytes: the VAE tile split's (`entry_share(entry_tiles(...))`,
    `entry_bytes(...)`; the defaults model a replicated entry)."""
    world = ulysses * ring
    grids = step_grids(inputs.stage)
    volumes = [comm_per_step(ulysses, ring, image_tokens(g), text_tokens, transformer, dtype_bytes) for g in grids]
    critical = sum(v.critical for v in volumes) / len(volumes)
    total = sum(v.total for v in volumes) / len(volumes)
    collectives = sum(v.collectives for v in volumes) / len(volumes)
    comm_s = critical / link.bytes_per_s + collectives * latency_s
    compute_s = inputs.transformer_step_s / world
    steps = inputs.stage.steps
    outside = inputs.entry_s * entry_share + entry_bytes / link.bytes_per_s + steps * inputs.guidance_step_s
    parallel_s = outside + steps * (compute_s + comm_s)
    overlapped_s = outside + steps * max(compute_s, comm_s)
    mode = "both" if ulysses > 1 and ring > 1 else ("ulysses" if ulysses > 1 else "ring")
    return Prediction(inputs.stage.name, mode, ulysses, ring, link.name, inputs.single_s, parallel_s, overlapped_s,
                      critical, total, comm_s, compute_s, outside)


# ---- inputs: measured (a GPU run's JSON) or assumed (FLOPs at stated rates) -----------------


def load_records(paths) -> list[dict[str, Any]]:
    """The records of benchmark JSONs (one path or several): each a list (`bench NAME --json`) or
    a gpu_check.json with `records`."""
    if not isinstance(paths, (list, tuple)):
        paths = [paths]
    return [record for path in paths for record in _load_one(path)]


def _load_one(path) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise HiFlowInputError("--measured", str(path), f"a readable JSON file of benchmark records ({exc})") from None
    records = data.get("records") if isinstance(data, dict) else data
    if not isinstance(records, list):
        raise HiFlowInputError("--measured", str(path), "a JSON list of records or a gpu_check.json with 'records'")
    return [r for r in records if isinstance(r, dict)]


def _e2e_stage_records(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """size 'HxW' -> the single-GPU `ours` e2e record of a high-res stage at that size, full model,
    on a GPU (a fully run stage before an extrapolated one)."""
    found: dict[str, dict[str, Any]] = {}
    for r in records:
        if (r.get("name") != "e2e" or r.get("path") != "ours" or r.get("device") != "cuda" or r.get("model") != "full"
                or r.get("skipped") or r.get("parallel") or not str(r.get("stage", "")).startswith("stage")
                or r.get("entry_s") is None or not r.get("step_median_s")):
            continue
        size = r.get("size")
        if size not in found or (found[size].get("estimated") and not r.get("estimated")):
            found[size] = r
    return found


def _guidance_s(records: Iterable[dict[str, Any]], grid: tuple[int, int]) -> float | None:
    for r in records:
        if (r.get("name") == "guidance" and r.get("path") == "fused" and r.get("device") == "cuda"
                and list(r.get("latent_hw") or []) == list(grid) and r.get("median_s")):
            return float(r["median_s"])
    return None


def guidance_bytes(grid: tuple[int, int], channels: int = 16) -> float:
    """Bytes one guidance step moves (fp32 latents; bench_e2e.GUIDANCE_LATENTS_MOVED of them)."""
    from hiflow_fast.bench.bench_e2e import GUIDANCE_LATENTS_MOVED

    return GUIDANCE_LATENTS_MOVED * channels * grid[0] * grid[1] * 4


def measured_inputs(records: list[dict[str, Any]], stage: StageSpec, transformer: dict[str, Any], text_tokens: int,
                    source_name: str) -> StageInputs | None:
    """The stage's inputs from a single-GPU run's records, or None when it has nothing usable.

    The per-step seconds of e2e include the guidance step: the transformer's share is the step
    less the guidance step (measured by bench guidance when present, else its bytes over the
    run's measured copy bandwidth). A stage the run did not reach is scaled from one it did (the
    FLOPs ratio of the transformer steps at the measured TFLOP/s; the VAE entry by its FLOPs)."""
    from hiflow_fast.bench import flux_shapes as fs

    by_size = _e2e_stage_records(records)
    grid = (stage.height // 8, stage.width // 8)

    def split(record) -> tuple[float, float, str]:
        record_grid = tuple(int(v) // 8 for v in record["size"].split("x"))
        guidance = _guidance_s(records, record_grid)
        if guidance is not None:
            how = "measured: bench guidance (fused)"
        else:
            guidance = guidance_bytes(record_grid) / float(record["copy_bandwidth_bytes_per_s"])
            how = "measured: its bytes over the run's measured copy bandwidth"
        return float(record["step_median_s"]) - guidance, guidance, how

    record = by_size.get(stage.size)
    if record is not None:
        transformer_s, guidance_s, guidance_how = split(record)
        sources = {
            "entry_s": f"measured: e2e entry_s of {stage.size} (plan {record['plan']}, {source_name})",
            "transformer_step_s": f"measured: e2e step_median_s of {stage.size} less the guidance step",
            "guidance_step_s": guidance_how,
        }
        return StageInputs(stage, float(record["entry_s"]), transformer_s, guidance_s, sources, record.get("device_name"))
    if not by_size:
        return None
    # Scale from the largest measured stage.
    size, record = max(by_size.items(), key=lambda item: int(item[0].split("x")[0]) * int(item[0].split("x")[1]))
    h, w = (int(v) for v in size.split("x"))
    measured_stage = next((s for s in STAGES.values() if s.size == size), StageSpec(size, h, w, 2, (h // 2, w // 2)))
    transformer_s, _, _ = split(record)
    mean_flops = lambda s: sum(fs.transformer_step_flops(transformer, image_tokens(g), text_tokens) for g in step_grids(s)) / s.steps  # noqa: E731
    rate = mean_flops(measured_stage) / transformer_s
    guidance_s = _guidance_s(records, grid)
    guidance_how = "measured: bench guidance (fused)"
    if guidance_s is None:
        guidance_s = guidance_bytes(grid) / float(record["copy_bandwidth_bytes_per_s"])
        guidance_how = "measured: its bytes over the run's measured copy bandwidth"
    # Tiled VAE work (both stages' entries decode the previous size and encode this one, in
    # 1024-pixel tiles) grows with the pixel count.
    pixels = lambda s: s.height * s.width + s.previous[0] * s.previous[1]  # noqa: E731
    entry_s = float(record["entry_s"]) * pixels(stage) / pixels(measured_stage)
    sources = {
        "entry_s": f"measured, scaled: e2e entry_s of {size} x the pixel ratio (tiled VAE work grows with the pixels)",
        "transformer_step_s": f"measured, scaled: {size}'s transformer step at its measured {rate / 1e12:.0f} TFLOP/s x the FLOPs ratio",
        "guidance_step_s": guidance_how,
    }
    return StageInputs(stage, entry_s, mean_flops(stage) / rate, guidance_s, sources, record.get("device_name"))


def _entry_flops(stage: StageSpec) -> float:
    """VAE FLOPs of a stage's entry: tiled decode of the previous stage, tiled encode of this one."""
    from hiflow_fast.bench import flux_shapes as fs

    vae = fs.model_size("full").vae
    return fs.vae_flops(vae, "decode", *stage.previous, tiled=True) + fs.vae_flops(vae, "encode", stage.height, stage.width, tiled=True)


def assumed_inputs(stage: StageSpec, transformer: dict[str, Any], text_tokens: int) -> StageInputs:
    """The stage's inputs from FLOP and byte counts at the assumed H100 rates above."""
    from hiflow_fast.bench import flux_shapes as fs

    grids = step_grids(stage)
    step_flops = sum(fs.transformer_step_flops(transformer, image_tokens(g), text_tokens) for g in grids) / len(grids)
    guidance = sum(guidance_bytes(g) for g in grids) / len(grids)
    pct = lambda rate, peak: f"{rate / 1e12:.0f} TFLOP/s ({rate / peak:.0%} of H100 SXM's {peak / 1e12:.0f} dense bf16)"  # noqa: E731
    sources = {
        "entry_s": f"assumed: VAE FLOPs (tiled) at {pct(ASSUMED_VAE_FLOPS, H100_BF16_DENSE_PEAK_FLOPS)}",
        "transformer_step_s": f"assumed: FLOPs at {pct(ASSUMED_MATMUL_FLOPS, H100_BF16_DENSE_PEAK_FLOPS)}",
        "guidance_step_s": f"assumed: bytes at {ASSUMED_COPY_BYTES_PER_S / 1e12:.2f} TB/s (80% of H100 SXM HBM3)",
    }
    return StageInputs(stage, _entry_flops(stage) / ASSUMED_VAE_FLOPS, step_flops / ASSUMED_MATMUL_FLOPS,
                       guidance / ASSUMED_COPY_BYTES_PER_S, sources, "H100 SXM (assumed)")


def as_record(prediction: Prediction, inputs: StageInputs, link_id: str, environment: dict[str, Any]) -> dict[str, Any]:
    """One prediction in the suite's record vocabulary; nothing in it is a measured time (median_s null)."""
    record = {
        "name": "parallel_model", "kind": "model", "note": MODEL_LABEL, "device": "model",
        "path": prediction.mode, "label": f"{prediction.stage}:{prediction.mode}x{prediction.world_size}:{link_id}",
        "median_s": None, "min_s": None, "max_s": None, "repeats": 0, "peak_bytes": None,
        "stage": prediction.stage, "size": inputs.stage.size, "steps": inputs.stage.steps, "link": link_id,
        "inputs_measured": inputs.measured, "inputs": {
            "entry_s": inputs.entry_s, "transformer_step_s": inputs.transformer_step_s,
            "guidance_step_s": inputs.guidance_step_s, "sources": inputs.sources, "device_name": inputs.device_name,
        },
    }
    fields = dataclasses.asdict(prediction)
    fields.pop("stage")
    record.update({f"modelled_{k}" if k.endswith("_s") else k: v for k, v in fields.items()})
    record.update(world_size=prediction.world_size, modelled_speedup=prediction.speedup,
                  modelled_efficiency=prediction.efficiency, modelled_overlapped_speedup=prediction.overlapped_speedup,
                  link_bytes_per_s=LINKS[link_id].bytes_per_s, link_source=LINKS[link_id].source)
    record.update({k: environment[k] for k in ("versions", "commit") if k in environment})
    record["device_name"] = f"{MODEL_LABEL}; inputs from {inputs.device_name}"
    return record
