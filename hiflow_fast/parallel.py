"""Context parallelism: one HiFlow generation split by sequence over the ranks of a process group.

The engine is diffusers' (0.42.1) context parallelism, not ours: its hooks split the
transformer's inputs by sequence (`FluxTransformer2DModel._cp_plan`: text and image tokens and
their ids) and gather the output of `proj_out`; its templated Ulysses and ring attention move
q/k/v between ranks. What HiFlow adds is small:

* **Uneven token counts.** Swin patchify alternates two grids per stage, and (h/2+1)(w/2+1)
  rarely divides by the world size. diffusers' `ulysses_anything` / `ring_anything` modes split
  any length (`tensor_split`) and we always use them. For Ulysses x ring together, diffusers
  0.42.1 has no "anything" mode; `_unified_anything` composes its two anything primitives (the
  Ulysses any-length all-to-all, then ring-anything attention over the ring group), so every mode
  takes every length, exactly, without padding or masks.
* **Our attention inside theirs.** The templated attention calls a per-backend "forward op";
  `_forward_op` adapts our registry's backends to it. Ring attention merges per-chunk partial
  outputs by their log-sum-exp, so the backends that can return it are ring-capable
  (`RING_BACKENDS`); Ulysses attends over the whole sequence for a subset of heads and takes any
  backend.
* **Proportional attention needs the global key length.** Inside a rank the processor sees only
  its own tokens; a forward pre-hook on the transformer records the joint length of the whole
  sequence before diffusers' hook splits it (`ParallelRun.joint_tokens`).
* **Nothing left behind.** `ParallelRun.applied(transformer)` installs diffusers' hooks for the
  duration of a call and removes them afterwards (diffusers' own `enable_parallelism` is
  one-way). Meshes are built once per run.

Every rank holds the whole latents; noise comes from the same seeded CPU generator; the guidance
step runs identically everywhere. `check_replicated` verifies at the end of each stage that no
rank diverged (one broadcast of the latents from rank 0 and one all-reduce of a flag, so that all
ranks raise together instead of one rank hanging in the next collective).

Which attention backend supports which mode:

    mode      backends
    ulysses   every registered backend (each rank attends over the whole sequence, some heads)
    ring      sdpa, sdpa-flash, sdpa-efficient, sdpa-math, triton (those that return the
              log-sum-exp; sdpa-cudnn and diffusers' flash/sage/xformers are refused)
    both      as ring

Ulysses needs the head count to split: H divisible by the degree, or padded by fewer heads than
each rank then holds (diffusers' rule); `check_heads` refuses the rest before any work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import os
import re
from typing import Iterator

import torch

from .errors import HiFlowInputError, ParallelDivergenceError

logger = logging.getLogger(__name__)

RING_BACKENDS = ("sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-math", "triton")
DEFAULT_TIMEOUT_S = 600.0
_SPEC_TEXT = "'ulysses=N', 'ring=N' or 'ulysses=N,ring=M' (N, M >= 1, product >= 2)"


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """Degrees of context parallelism: `ulysses` x `ring` ranks."""

    ulysses: int = 1
    ring: int = 1

    @property
    def world_size(self) -> int:
        return self.ulysses * self.ring

    @property
    def mode(self) -> str:
        if self.ulysses > 1 and self.ring > 1:
            return "both"
        return "ulysses" if self.ulysses > 1 else "ring"

    def __str__(self) -> str:
        parts = [f"ulysses={self.ulysses}"] if self.ulysses > 1 else []
        parts += [f"ring={self.ring}"] if self.ring > 1 else []
        return ",".join(parts)

    @classmethod
    def parse(cls, text: str, field: str = "parallel") -> "ParallelSpec":
        """'ulysses=2', 'ring=4', 'ulysses=2,ring=2' (spaces allowed; each key at most once)."""
        if not isinstance(text, str) or not text.strip():
            raise HiFlowInputError(field, text, _SPEC_TEXT)
        degrees: dict[str, int] = {}
        for part in text.split(","):
            match = re.fullmatch(r"\s*(ulysses|ring)\s*=\s*(\d+)\s*", part)
            if match is None or match.group(1) in degrees:
                raise HiFlowInputError(field, text, _SPEC_TEXT)
            degrees[match.group(1)] = int(match.group(2))
        return cls._checked(degrees.get("ulysses", 1), degrees.get("ring", 1), field, text)

    @classmethod
    def _checked(cls, ulysses, ring, field, shown) -> "ParallelSpec":
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in (ulysses, ring)) or ulysses * ring < 2:
            raise HiFlowInputError(field, shown, _SPEC_TEXT)
        return cls(ulysses, ring)


def as_parallel_spec(value, field: str = "parallel") -> ParallelSpec | None:
    """A ParallelSpec from a spec string, a ParallelSpec or a diffusers ContextParallelConfig
    (its degrees are used; its anything flags are ours to set); None stays None."""
    if value is None or isinstance(value, ParallelSpec):
        return value
    if isinstance(value, str):
        return ParallelSpec.parse(value, field)
    from diffusers import ContextParallelConfig

    if isinstance(value, ContextParallelConfig):
        if value.mesh is not None:
            raise HiFlowInputError(f"{field}.mesh", "a DeviceMesh", "None (hiflow_fast builds the (ring, ulysses) mesh itself)")
        return ParallelSpec._checked(value.ulysses_degree or 1, value.ring_degree or 1, field, value)
    raise HiFlowInputError(field, type(value).__name__, f"None, a ContextParallelConfig, a ParallelSpec or {_SPEC_TEXT}")


def check_heads(spec: ParallelSpec, heads: int, field: str = "parallel") -> None:
    """Refuse a Ulysses degree the transformer's heads cannot be split (or padded) over."""
    if spec.ulysses <= 1 or heads % spec.ulysses == 0:
        return
    pad = spec.ulysses - heads % spec.ulysses
    if pad < (heads + pad) // spec.ulysses:  # diffusers pads by fewer heads than each rank holds
        return
    fits = [d for d in range(2, heads + 1) if heads % d == 0 or (d - heads % d) < (heads + d - heads % d) // d]
    raise HiFlowInputError(field, str(spec), f"a Ulysses degree the model's {heads} attention heads split over: {fits} (or use ring=N)")


def check_backend(spec: ParallelSpec, attention: str, field: str = "attention") -> None:
    """Refuse an attention backend that cannot serve the spec's mode."""
    if spec.ring > 1 and attention not in RING_BACKENDS:
        raise HiFlowInputError(
            field, attention, f"one of {', '.join(RING_BACKENDS)} with ring attention (it needs the log-sum-exp); any backend with ulysses only"
        )


def check_process_group(spec: ParallelSpec, device: str | torch.device | None = None, field: str = "parallel") -> None:
    """The default process group exists, has exactly the spec's world size and, given the
    pipeline's device, a backend that moves its tensors (NCCL for CUDA, gloo for the CPU)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise HiFlowInputError(
            field, str(spec), "a run with torch.distributed initialised: launch with torchrun and call hiflow_fast.parallel.init_distributed()"
        )
    world = dist.get_world_size()
    if world != spec.world_size:
        raise HiFlowInputError(field, str(spec), f"degrees whose product is the world size, {world} (this is {spec.world_size})")
    if device is not None:
        needed = {"cuda": "nccl", "cpu": "gloo"}.get(torch.device(device).type)
        backend = str(dist.get_backend())
        if needed is None or needed not in backend:
            raise HiFlowInputError(
                field, str(spec), f"a process group whose backend serves {torch.device(device)} (nccl for cuda, gloo for cpu; this one is {backend!r})"
            )


def check_transformer(spec: ParallelSpec, transformer, field: str = "parallel") -> None:
    """A Flux transformer with diffusers' context-parallel plan, heads that split for Ulysses."""
    from diffusers.models._modeling_parallel import ContextParallelOutput

    plan = getattr(type(transformer), "_cp_plan", None)
    if not plan or plan.get("proj_out") != ContextParallelOutput(gather_dim=1, expected_dims=3):
        raise HiFlowInputError(field, str(spec), f"a Flux transformer with diffusers' context-parallel plan (not {type(transformer).__name__})")
    check_heads(spec, int(transformer.config.num_attention_heads), field)


def check_launch(spec: ParallelSpec, device: str | torch.device = "cpu", field: str = "--parallel") -> None:
    """The torchrun environment fits the spec and the device; the same verdict on every rank."""
    missing = [name for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise HiFlowInputError(
            field, str(spec), f"a launch by torchrun (torchrun --nproc-per-node {spec.world_size} -m hiflow_fast.cli generate ... --parallel {spec}); {', '.join(missing)} not set"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != spec.world_size:
        raise HiFlowInputError(field, str(spec), f"degrees whose product is the number of processes torchrun started, {world}")
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise HiFlowInputError("--device", str(device), "cuda (each rank uses cuda:LOCAL_RANK under --parallel)")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if per_node > torch.cuda.device_count():
            raise HiFlowInputError(field, str(spec), f"at most {torch.cuda.device_count()} processes per node (one per GPU; {per_node} started)")
    elif device.type != "cpu":
        raise HiFlowInputError("--device", str(device), "cpu or cuda with --parallel")


def init_distributed(spec: ParallelSpec, device: str | torch.device = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S,
                     field: str = "--parallel") -> torch.device:
    """Join the process group of a torchrun launch and return this rank's device.

    gloo on a CPU; on CUDA "cpu:gloo,cuda:nccl" (NCCL for the tensors, gloo for the few host
    integers diffusers' any-length collectives exchange) and cuda:LOCAL_RANK. Every collective
    times out after `timeout_s`, so a rank whose peer died raises instead of hanging."""
    import torch.distributed as dist

    check_launch(spec, device, field)
    device = torch.device(device)
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a process outside one; known before the process group
    is joined (RANK is torchrun's). Under torchrun every rank checks the same arguments, so one
    copy of an input error (rank 0's) is enough."""
    return os.environ.get("RANK", "0") == "0"


# ---- attention inside diffusers' templated context-parallel attention ----------------------


def _cuda_flash_runs(q: torch.Tensor) -> bool:
    """Whether the raw aten flash kernel takes `q` on this GPU: half precision, sm_80 or newer,
    a head dim it handles unpadded (F.sdpa pads others; the aten op does not)."""
    head_dim = q.shape[-1]
    return (
        q.dtype in (torch.float16, torch.bfloat16)
        and torch.backends.cuda.is_flash_attention_available()
        and torch.cuda.get_device_capability(q.device) >= (8, 0)
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def _attention_with_lse(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """(out [B, S, H, D] in q.dtype, lse [B, S, H] fp32) by the kernel backend `name` names."""
    if name == "triton":
        from .ops.flash_attention import flash_attention_with_lse

        return flash_attention_with_lse(q, k, v, scale)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if name == "sdpa-math":
        scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vt.float()).to(q.dtype)
    elif q.device.type == "cpu":
        # The CPU flash kernel SDPA itself dispatches to (bit-identical to F.sdpa there).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, scale=scale)
    elif name != "sdpa-efficient" and _cuda_flash_runs(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt, scale=scale)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(qt, kt, vt, None, True, scale=scale)[:2]
        lse = lse[..., : q.shape[1]]  # the CUDA kernel pads the lse rows to a multiple of 32
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def _forward_op(name: str, attention_fn):
    """A forward op in the signature diffusers' templated attention calls."""

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if return_lse:
            return _attention_with_lse(name, query, key, value, scale)
        return attention_fn(query, key, value, scale)

    return forward_op


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise RuntimeError("hiflow_fast's context-parallel attention is inference only")


def _unified_anything(query, key, value, scale, forward_op, config):
    """Ulysses over the 'ulysses' mesh dim, then ring over 'ring', for any sequence lengths:
    diffusers' any-length all-to-all and ring-anything attention, composed as its unified path
    composes the equal-length ones."""
    from diffusers.models.attention_dispatch import (
        TemplatedRingAnythingAttention,
        all_to_all_single_any_o_async,
        all_to_all_single_any_qkv_async,
        ulysses_anything_metadata,
    )

    group = config.context_parallel_config._ulysses_mesh.get_group()
    metadata = ulysses_anything_metadata(query)
    waits = [all_to_all_single_any_qkv_async(x, group, **metadata) for x in (query, key, value)]
    query, key, value = (wait() for wait in waits)
    out = TemplatedRingAnythingAttention.apply(
        query, key, value, None, 0.0, False, scale, False, False, forward_op, _no_backward, config
    )
    return all_to_all_single_any_o_async(out, group, **metadata)()


@functools.cache
def _mesh(spec: ParallelSpec, device_type: str):
    """The (ring, ulysses) device mesh of the default group, one per spec and device type: each
    mesh makes new process groups (NCCL communicators hold GPU memory), so they are reused."""
    return torch.distributed.device_mesh.init_device_mesh(
        device_type, mesh_shape=(spec.ring, spec.ulysses), mesh_dim_names=("ring", "ulysses")
    )


class ParallelRun:
    """Context parallelism for one pipeline: the spec, its mesh (built once) and the state the
    attention processors read during a call."""

    def __init__(self, spec: ParallelSpec):
        self.spec = spec
        self.joint_tokens: int | None = None  # text + image tokens of the current call, all ranks
        self.image_tokens: int | None = None  # image tokens of the current call, all ranks
        self._config = None

    def setup(self, device: torch.device) -> None:
        """diffusers' ParallelConfig for this spec on a (ring, ulysses) mesh of the default group,
        on `device`'s type (the pipeline's, which the caller has checked the group serves:
        check_process_group); the mesh and its process groups are made once per spec and device
        type in a process, however often parallelism is enabled."""
        import torch.distributed as dist
        from diffusers import ContextParallelConfig
        from diffusers.models._modeling_parallel import ParallelConfig

        device = torch.device(device)
        if self._config is None or self._config._device.type != device.type:
            spec = self.spec
            cp = ContextParallelConfig(
                ulysses_degree=spec.ulysses,
                ring_degree=spec.ring,
                ulysses_anything=spec.mode == "ulysses",
                ring_anything=spec.mode == "ring",
            )
            if spec.mode == "both":
                # diffusers validates the anything flags against one degree only; its hooks read
                # them to pick the any-length sharder, which `_unified_anything` needs.
                cp.ulysses_anything = True
            config = ParallelConfig(context_parallel_config=cp)
            config.setup(dist.get_rank(), dist.get_world_size(), device, mesh=_mesh(spec, device.type))
            self._config = config

    @property
    def config(self):
        """The ParallelConfig of the last `setup` (a call sets it up before any transformer pass)."""
        if self._config is None:
            raise RuntimeError("ParallelRun.setup(device) was not called")
        return self._config

    def attention(self, name: str, attention_fn):
        """fn(q, k, v, scale) -> out: attention over the whole sequence, from this rank's part."""
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention

        forward_op = _forward_op(name, attention_fn)

        def attend(query, key, value, scale):
            config = self.config
            if self.spec.mode == "both":
                return _unified_anything(query, key, value, scale, forward_op, config)
            return _templated_context_parallel_attention(
                query, key, value, None, 0.0, False, scale, False, False,
                forward_op=forward_op, backward_op=_no_backward, _parallel_config=config,
            )

        return attend

    @contextlib.contextmanager
    def applied(self, transformer) -> Iterator["ParallelRun"]:
        """diffusers' split/gather hooks on `transformer` (its `_cp_plan`) and our pre-hook that
        records the global joint length; all removed on exit."""
        from diffusers.hooks.context_parallel import apply_context_parallel, remove_context_parallel
        from diffusers.hooks.hooks import HookRegistry

        check_transformer(self.spec, transformer)
        config = self.config
        split_plan = {name: entry for name, entry in type(transformer)._cp_plan.items() if name != "proj_out"}

        def record_lengths(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            self.image_tokens = int(hidden.shape[1])
            self.joint_tokens = self.image_tokens + (int(text.shape[1]) if text is not None else 0)

        # diffusers' hook removal leaves a bound `forward` and an empty hook registry on each
        # module it touched; what was there before is put back exactly.
        touched = [transformer, transformer.proj_out]
        saved = [{key: vars(m)[key] for key in ("forward", "_diffusers_hook") if key in vars(m)} for m in touched]
        handle = None
        try:
            apply_context_parallel(transformer, config.context_parallel_config, split_plan)
            HookRegistry.check_if_exists_or_initialize(transformer.proj_out).register_hook(_image_gather_hook_type()(self), _GATHER_HOOK)
            handle = transformer.register_forward_pre_hook(record_lengths, with_kwargs=True)
            yield self
        finally:
            # Each removal tolerates a hook that a failed install never added.
            if handle is not None:
                handle.remove()
            if hasattr(transformer.proj_out, "_diffusers_hook"):
                transformer.proj_out._diffusers_hook.remove_hook(_GATHER_HOOK)
            if hasattr(transformer, "_diffusers_hook"):
                remove_context_parallel(transformer, split_plan)
            for module, before in zip(touched, saved):
                for key in ("forward", "_diffusers_hook"):
                    vars(module).pop(key, None)
                vars(module).update(before)
            self.joint_tokens = self.image_tokens = None

    @contextlib.contextmanager
    def split_vae_tiles(self, vae) -> Iterator[None]:
        """The VAE's tiled decode and encode with their tiles computed round-robin across the
        ranks (tile k on rank k mod N), then given to every rank; diffusers' own tiled_decode /
        _tiled_encode then blend them, so the result is the single-process tiled result bit for
        bit. Untiled calls (small images) run on every rank as before. Restored on exit; a VAE
        without diffusers' AutoencoderKL tiling is left as it is."""
        cls = type(vae)
        if not all(hasattr(cls, name) for name in ("tiled_decode", "_tiled_encode", "blend_v", "blend_h")):
            yield
            return

        def split(method: str, x, tile: int, network: str, conv: str, conv_first: bool, **kwargs):
            """cls.<method> (diffusers' tiled loop) with `network` (+ its 1x1 `conv`, before or
            after it, where the config uses one) computed tile by tile across the ranks first."""
            use_conv = getattr(vae.config, f"use_{conv}")

            def compute(t):
                if use_conv and conv_first:
                    t = getattr(vae, conv)(t)
                t = getattr(vae, network)(t)
                return getattr(vae, conv)(t) if use_conv and not conv_first else t

            tiles = _tiles_across_ranks(x, tile, int(tile * (1 - vae.tile_overlap_factor)), compute)
            replaced = {network: _TileReplay(tiles), **({conv: torch.nn.Identity()} if use_conv else {})}
            with _submodules_replaced(vae, replaced):
                return getattr(cls, method)(vae, x, **kwargs)

        def tiled_decode(z, return_dict=True):
            return split("tiled_decode", z, vae.tile_latent_min_size, "decoder", "post_quant_conv", True, return_dict=return_dict)

        def tiled_encode(x):
            return split("_tiled_encode", x, vae.tile_sample_min_size, "encoder", "quant_conv", False)

        saved = {name: vars(vae)[name] for name in ("tiled_decode", "_tiled_encode") if name in vars(vae)}
        vae.tiled_decode, vae._tiled_encode = tiled_decode, tiled_encode
        try:
            yield
        finally:
            for name in ("tiled_decode", "_tiled_encode"):
                vars(vae).pop(name, None)
            vars(vae).update(saved)


def _tiles_across_ranks(x: torch.Tensor, tile: int, overlap: int, compute) -> list[torch.Tensor]:
    """compute(tile) for every tile of diffusers' tiled VAE grid (rows then columns, `tile` wide,
    starting every `overlap`), each computed on one rank (k mod N) and broadcast from it."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    corners = [(i, j) for i in range(0, x.shape[2], overlap) for j in range(0, x.shape[3], overlap)]
    mine = {k: compute(x[:, :, i : i + tile, j : j + tile]).contiguous()
            for k, (i, j) in enumerate(corners) if k % world == rank}
    # Output shapes come from the owners (the VAE decides them); one small exchange per call.
    shapes: list = [None] * world
    dist.all_gather_object(shapes, {k: (tuple(t.shape), t.dtype) for k, t in mine.items()})
    tiles = []
    for k in range(len(corners)):
        owner = k % world
        if owner == rank:
            tensor = mine[k]
        else:
            shape, dtype = shapes[owner][k]
            tensor = torch.empty(shape, dtype=dtype, device=x.device)
        dist.broadcast(tensor, src=owner)
        tiles.append(tensor)
    return tiles


class _TileReplay(torch.nn.Module):
    """Stands in for the VAE's encoder or decoder inside diffusers' tiled loop: returns the
    tiles already computed, in the loop's order."""

    def __init__(self, tiles: list[torch.Tensor]):
        super().__init__()
        self._tiles = iter(tiles)

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        return next(self._tiles)


@contextlib.contextmanager
def _submodules_replaced(module: torch.nn.Module, replacements: dict[str, torch.nn.Module]) -> Iterator[None]:
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, replacement in replacements.items():
            setattr(module, name, replacement)
        yield
    finally:
        for name, original in saved.items():
            setattr(module, name, original)


_GATHER_HOOK = "hiflow_cp_output---proj_out"


@functools.cache
def _image_gather_hook_type():
    """The hook class, made on first use: diffusers is imported only when a run is parallel
    (the CLI imports this module for `is_main_process` on every start)."""
    from diffusers.hooks.hooks import ModelHook

    class ImageGatherHook(ModelHook):
        """Gathers `proj_out`'s image tokens from every rank (in place of diffusers' gather for that
        one output). diffusers' any-length gather all-gathers tensors of different sizes, which gloo
        refuses; the split sizes are known here (tensor_split of the recorded global length), so each
        rank pads its part to the largest, one equal-size all-gather runs on any backend, and the
        padding is dropped."""

        def __init__(self, run: "ParallelRun"):
            super().__init__()
            self.run = run

        def post_forward(self, module, output):
            import torch.distributed as dist

            group = self.run.config.context_parallel_config._flattened_mesh.get_group()
            world = dist.get_world_size(group)
            total = self.run.image_tokens
            sizes = [total // world + (1 if r < total % world else 0) for r in range(world)]
            part = output.contiguous()
            if part.shape[1] < sizes[0]:
                part = torch.cat([part, part.new_zeros(part.shape[0], sizes[0] - part.shape[1], *part.shape[2:])], dim=1)
            gathered = part.new_empty(world * part.shape[0], *part.shape[1:])
            # torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
            all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
            all_gather(gathered, part, group=group)
            pieces = gathered.chunk(world, dim=0)
            return torch.cat([piece[:, :size] for piece, size in zip(pieces, sizes)], dim=1)

    return ImageGatherHook


def seed_from_rank_zero(seed: int) -> int:
    """Rank 0's `seed` on every rank (a call without a seed draws one per process)."""
    import torch.distributed as dist

    shared = [seed]
    dist.broadcast_object_list(shared, src=0)
    return int(shared[0])


def check_replicated(x: torch.Tensor, where: str) -> None:
    """ParallelDivergenceError on every rank when any rank's `x` differs from rank 0's."""
    import torch.distributed as dist

    reference = x.detach().clone().contiguous()
    dist.broadcast(reference, src=0)
    # Compared as bits: NaN in the same place on every rank is replicated (and then reported by
    # the finite check as NaN), not a divergence.
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    same = torch.equal(reference.view(bits), x.detach().contiguous().view(bits))
    diverged = torch.tensor([0.0 if same else 1.0], device=x.device)
    dist.all_reduce(diverged, op=dist.ReduceOp.MAX)
    if diverged.item():
        raise ParallelDivergenceError(f"the ranks' latents differ after {where}; they must be replicated exactly")
