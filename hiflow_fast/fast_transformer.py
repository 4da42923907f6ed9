"""The lean-memory transformer path for 2K/4K: fused q/k norm + RoPE, chunked MLPs, in-place
residuals, and torch.compile + CUDA-graph capture per stage. Per instance and undone on exit.

At 4096^2 one Flux step attends over 66,048 tokens. Stock diffusers (and the official HiFlow
code) builds float64 RoPE tables, upcasts q and k to fp32 to rotate them, materialises the
4x-wide MLP activations of all tokens at once and allocates a new tensor for every gate and
residual -- several GB of temporaries per block. This module changes, per transformer instance:

* `pos_embed` -> `FastNTKFluxPosEmbed`: returns a `FusedRope` (ids + theta x ntk) instead of
  cos/sin tables when the fast processors are active;
* every attention processor -> `FastHiFlowAttnProcessor` (a `HiFlowAttnProcessor`): q/k/v
  projected straight into the joint text+image buffers, q and k normalised and rotated in place
  by hiflow_fast::qk_norm_rope (or its torch reference on CPU), then the attention backend of
  the registry (hiflow_fast.attention_backends), optionally ours with RoPE applied on load;
* every block's `forward` -> a memory-lean equivalent: the feed-forward (double blocks) and
  proj_mlp/proj_out (single blocks) run over chunks of `chunk_tokens` tokens, gates and residuals
  are applied in place (same operations, same rounding as diffusers), and a single block reuses
  the previous block's joint buffer instead of concatenating text and image again.

    with fast_transformer(transformer, attention="triton", compile=True) as patch:
        patch.use_base()              # base stage: stock processors (1K needs no fast path)
        patch.use_highres(ntk_factor) # high-res stage: fast processors, fused RoPE
        transformer(...)              # as usual; compiled/graphed when asked

Blocks update their hidden-state inputs in place: call them through the transformer's forward
(as diffusers does), not with tensors you still need. Blocks that carry diffusers hooks (block
caches keep block outputs) or an instance-level forward already keep their stock forward.

Compile switch (`compile=True`): the transformer's forward goes through
torch.compile(fullgraph=True, dynamic=False); on CUDA (`cuda_graphs`, default on for CUDA) each
call signature of each stage -- swin patchify alternates two token counts within a stage, so
two per stage -- is captured once as a CUDA graph (all graphs share one memory pool) and then
replayed; `patch.graph_stats()` reports the warm-up (compile + capture) seconds per signature.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from .backend import resolve_backend
from .errors import HiFlowInputError
from .ref.rope import ntk_rope_cos_sin
from .transformer import HiFlowAttnProcessor, NTKFluxPosEmbed

logger = logging.getLogger(__name__)

# Tokens per chunk of the MLPs: 8192 x 12288 bf16 = 200 MB per intermediate at Flux width,
# large enough that every chunk's GEMMs still saturate an H100.
DEFAULT_CHUNK_TOKENS = 8192
_FP16_MAX = 65504.0


# ---- RoPE without tables ----------------------------------------------------------------


@dataclass(frozen=True)
class FusedRope:
    """What `FastNTKFluxPosEmbed` hands the processors instead of cos/sin tables: the position
    ids [S, n_axes] (fp32) of the joint sequence, theta (x NTK factor) and the per-axis dims.
    Deliberately not a tuple: a stock processor that got one fails instead of mis-rotating."""

    ids: torch.Tensor
    theta: float
    axes_dim: tuple[int, ...]

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The cos/sin tables of the reference path (for processors that need them)."""
        return ntk_rope_cos_sin(self.ids, self.axes_dim, theta=self.theta)


class FastNTKFluxPosEmbed(NTKFluxPosEmbed):
    """NTK Flux RoPE that returns `FusedRope` (no tables) while `fused` is set."""

    def __init__(self, theta: int, axes_dim: list[int], ntk_factor: float = 1.0, fused: bool = True):
        super().__init__(theta=theta, axes_dim=axes_dim, ntk_factor=ntk_factor)
        self.fused = fused

    @classmethod
    def from_pos_embed(cls, pos_embed, ntk_factor: float = 1.0, fused: bool = True) -> "FastNTKFluxPosEmbed":
        return cls(theta=pos_embed.theta, axes_dim=list(pos_embed.axes_dim), ntk_factor=ntk_factor, fused=fused)

    def forward(self, ids: torch.Tensor):
        if not self.fused:
            return super().forward(ids)
        return FusedRope(ids.float(), float(self.theta) * float(self.ntk_factor), tuple(int(d) for d in self.axes_dim))


# ---- kernel choice for the fused norm + RoPE ----------------------------------------------



def resolve_kernels(requested: str | None, device: torch.device) -> str:
    """"triton" or "ref" for the fused q/k norm + RoPE, chosen exactly as the guidance step's
    backend (`hiflow_fast.backend.resolve_backend`: the argument, else $HIFLOW_BACKEND, else
    "auto" = Triton on CUDA, the torch reference elsewhere; "triton" on CPU switches Triton to its
    interpreter). "native" has no norm + RoPE kernel (csrc/ covers the guidance ops only): the
    transformer then runs the torch reference, as documented for the native backend."""
    name = resolve_backend(requested, device=device, field="kernels")
    return "ref" if name == "native" else name


def _rms_eps(norm: torch.nn.Module, dtype: torch.dtype) -> float:
    return float(norm.eps) if norm.eps is not None else float(torch.finfo(dtype).eps)


# ---- attention processor ------------------------------------------------------------------


def _plain_linear(module: torch.nn.Module) -> bool:
    # A Linear carrying diffusers hooks (layerwise casting: fp8-stored weights upcast on each
    # forward) must run its forward: its weight tensor alone is not what it computes with.
    return type(module) is torch.nn.Linear and not getattr(getattr(module, "_diffusers_hook", None), "hooks", None)


def _linear_into(linear: torch.nn.Linear, x: torch.Tensor, out: torch.Tensor) -> None:
    """out[b] <- linear(x[b]) without a temporary (out: rows contiguous per batch item)."""
    weight_t = linear.weight.t()
    for b in range(x.shape[0]):
        if linear.bias is not None:
            torch.addmm(linear.bias, x[b], weight_t, out=out[b])
        else:
            torch.mm(x[b], weight_t, out=out[b])


def _joint_projection(img_linear, x_img: torch.Tensor, txt_linear, x_txt: torch.Tensor | None) -> torch.Tensor:
    """[B, T + S, F]: the text projection of x_txt followed by the image projection of x_img,
    written straight into one buffer (no per-stream tensors, no concatenation)."""
    if txt_linear is None or x_txt is None:
        return img_linear(x_img)
    if torch.compiler.is_compiling() or not (_plain_linear(img_linear) and _plain_linear(txt_linear)):
        # Inductor plans the concatenation itself; modules that are not plain Linear (LoRA,
        # quantised) keep their own forward.
        return torch.cat([txt_linear(x_txt), img_linear(x_img)], dim=1)
    batch, n_img, _ = x_img.shape
    n_txt = x_txt.shape[1]
    out = x_img.new_empty(batch, n_txt + n_img, img_linear.out_features)
    _linear_into(txt_linear, x_txt, out[:, :n_txt])
    _linear_into(img_linear, x_img, out[:, n_txt:])
    return out


class FastHiFlowAttnProcessor(HiFlowAttnProcessor):
    """HiFlow attention with fused q/k RMSNorm + RoPE and lean projections.

    Takes `FusedRope` from `FastNTKFluxPosEmbed`; given cos/sin tables (or a module layout it
    does not know) it runs `HiFlowAttnProcessor`'s reference path instead.
    kernels: "triton" (hiflow_fast::qk_norm_rope) or "ref" (hiflow_fast.ref.qk_norm_rope).
    rope_in_attention: with attention="triton", q/k are only normalised here and rotated as
    the attention kernel loads their tiles."""

    def __init__(
        self,
        proportional: bool = True,
        attention: str | None = None,
        kernels: str = "ref",
        rope_in_attention: bool = False,
    ):
        super().__init__(proportional=proportional, attention=attention)
        if kernels not in ("triton", "ref"):
            raise HiFlowInputError("kernels", kernels, "'triton' or 'ref' (see resolve_kernels)")
        if rope_in_attention and self.attention_name != "triton":
            raise HiFlowInputError(
                "rope_in_attention", rope_in_attention, f"False with attention={self.attention_name!r} (True needs 'triton')"
            )
        self.kernels = kernels
        self.rope_in_attention = bool(rope_in_attention)
        if kernels == "triton" or rope_in_attention:
            # Registers the custom ops (hiflow_fast::qk_norm_rope, hiflow_fast::flash_attention).
            from .ops import flash_attention as _fa  # noqa: F401
            from .ops import qk_norm_rope as _qk  # noqa: F401

    @staticmethod
    def _supports(attn) -> bool:
        norms = [attn.norm_q, attn.norm_k]
        if attn.added_kv_proj_dim is not None:
            norms += [attn.norm_added_q, attn.norm_added_k]
        if getattr(attn, "fused_projections", False) or not all(isinstance(n, torch.nn.RMSNorm) for n in norms):
            return False
        if len({(n.eps, n.weight is None) for n in norms}) != 1:
            return False
        return attn.head_dim % 2 == 0

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb=None,
    ):
        rope = image_rotary_emb
        if not isinstance(rope, FusedRope) or not self._supports(attn):
            if isinstance(rope, FusedRope):
                rope = rope.tables()
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rope)
        if attention_mask is not None:
            raise HiFlowInputError("attention_mask", "a tensor", "None (HiFlow's Flux attention takes no mask)")

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        n_txt = encoder_hidden_states.shape[1] if joint else 0
        query = _joint_projection(attn.to_q, hidden_states, attn.add_q_proj if joint else None, encoder_hidden_states)
        key = _joint_projection(attn.to_k, hidden_states, attn.add_k_proj if joint else None, encoder_hidden_states)
        value = _joint_projection(attn.to_v, hidden_states, attn.add_v_proj if joint else None, encoder_hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))

        eps = _rms_eps(attn.norm_q, query.dtype)
        q_weight, k_weight = attn.norm_q.weight, attn.norm_k.weight
        q_weight_txt = attn.norm_added_q.weight if joint else None
        k_weight_txt = attn.norm_added_k.weight if joint else None
        rope_ids = None if self.rope_in_attention else rope.ids
        if self.kernels == "triton":
            from .ops.qk_norm_rope import qk_norm_rope

            in_place = {"inplace": True}  # q and k are this processor's own projections
        else:
            from .ref.qk_norm_rope import qk_norm_rope

            in_place = {}
        query, key = qk_norm_rope(
            query,
            key,
            q_weight,
            k_weight,
            rope_ids,
            rope.axes_dim,
            rope.theta,
            1.0,
            eps,
            q_weight_txt=q_weight_txt,
            k_weight_txt=k_weight_txt,
            n_txt=n_txt,
            **in_place,
        )

        if self.rope_in_attention:
            from .ops.flash_attention import RopeSpec, flash_attention

            scale = self.softmax_scale(key.shape[1], query.shape[-1])
            hidden_states = flash_attention(query, key, value, scale, rope=RopeSpec(rope.ids, rope.axes_dim, rope.theta))
        else:
            hidden_states = self.attend(query, key, value)
        del query, key, value
        return self.project_out(attn, hidden_states.flatten(2, 3), encoder_hidden_states)


# ---- memory-lean block forwards -----------------------------------------------------------


def _chunks(length: int, chunk: int | None) -> list[slice]:
    if not chunk or chunk >= length:
        return [slice(0, length)]
    return [slice(start, min(start + chunk, length)) for start in range(0, length, chunk)]


def _gated_feed_forward_(x, norm, ff, shift, scale, gate, chunk: int | None) -> None:
    """x += gate * ff(norm(x) * (1 + scale) + shift), chunk by chunk along the sequence, in
    place -- diffusers' operations in diffusers' order, without full-size temporaries."""
    scale1 = 1 + scale[:, None]
    shift = shift[:, None]
    gate = gate.unsqueeze(1)
    for part in _chunks(x.shape[1], chunk):
        x_part = x[:, part]
        h = norm(x_part)
        h.mul_(scale1).add_(shift)
        h = ff(h)
        h.mul_(gate)
        x_part.add_(h)


def _fast_double_block_forward(
    block,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb=None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    *,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
):
    """FluxTransformerBlock.forward with in-place gated residuals and a chunked feed-forward."""
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)
    norm_encoder_hidden_states, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(
        encoder_hidden_states, emb=temb
    )
    attention_outputs = block.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **(joint_attention_kwargs or {}),
    )
    del norm_hidden_states, norm_encoder_hidden_states
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]

    attn_output.mul_(gate_msa.unsqueeze(1))
    hidden_states.add_(attn_output)
    del attn_output
    _gated_feed_forward_(hidden_states, block.norm2, block.ff, shift_mlp, scale_mlp, gate_mlp, chunk_tokens)
    if len(attention_outputs) == 3:
        hidden_states.add_(attention_outputs[2])

    context_attn_output.mul_(c_gate_msa.unsqueeze(1))
    encoder_hidden_states.add_(context_attn_output)
    del context_attn_output, attention_outputs
    _gated_feed_forward_(
        encoder_hidden_states, block.norm2_context, block.ff_context, c_shift_mlp, c_scale_mlp, c_gate_mlp, chunk_tokens
    )
    if encoder_hidden_states.dtype == torch.float16:
        encoder_hidden_states.clamp_(-_FP16_MAX, _FP16_MAX)
    return encoder_hidden_states, hidden_states


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are views of one storage: compared by storage identity, not by data
    pointer, so that fake tensors (the activation-memory count of bench_transformer) give the
    same answer as real ones."""
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def _joint_sequence(encoder_hidden_states: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """cat([text, image], dim=1) -- or, when the two are the adjacent halves of one buffer (the
    previous single block's output), that buffer itself, without a copy (eager only)."""
    e, h = encoder_hidden_states, hidden_states
    if (
        not torch.compiler.is_compiling()
        and e.dim() == 3
        and h.dim() == 3
        and e.dtype == h.dtype
        and e.device == h.device
        and e.shape[0] == h.shape[0]
        and e.shape[2] == h.shape[2]
        and e.stride() == h.stride()
        and e.stride(2) == 1
        and e.stride(1) == e.shape[2]
        and e.stride(0) == (e.shape[1] + h.shape[1]) * e.shape[2]
        and _same_storage(e, h)
        and h.storage_offset() == e.storage_offset() + e.shape[1] * e.stride(1)
    ):
        return e.as_strided((e.shape[0], e.shape[1] + h.shape[1], e.shape[2]), e.stride(), e.storage_offset())
    return torch.cat([e, h], dim=1)


def _fast_single_block_forward(
    block,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    image_rotary_emb=None,
    joint_attention_kwargs: dict[str, Any] | None = None,
    *,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
):
    """FluxSingleTransformerBlock.forward with the MLP and proj_out chunked along the sequence
    and the gated residual written in place into the joint buffer."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden = _joint_sequence(encoder_hidden_states, hidden_states)
    norm_hidden_states, gate = block.norm(hidden, emb=temb)
    attn_output = block.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    gate = gate.unsqueeze(1)
    for part in _chunks(hidden.shape[1], chunk_tokens):
        mlp = block.act_mlp(block.proj_mlp(norm_hidden_states[:, part]))
        out = block.proj_out(torch.cat([attn_output[:, part], mlp], dim=2))
        del mlp
        out.mul_(gate)
        hidden[:, part].add_(out)
        del out
    if hidden.dtype == torch.float16:
        hidden.clamp_(-_FP16_MAX, _FP16_MAX)
    return hidden[:, :text_seq_len], hidden[:, text_seq_len:]


def _block_is_patchable(block) -> bool:
    if "forward" in vars(block):
        return False
    registry = getattr(block, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", None)
    return not hooks


# ---- CUDA graphs per call signature -------------------------------------------------------


@dataclass
class _Graph:
    graph: Any
    static_leaves: list
    static_output: Any
    seconds: float


def _signature(leaves, spec) -> tuple:
    out = [str(spec)]
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(("T", tuple(leaf.shape), leaf.dtype, str(leaf.device), leaf.stride()))
        else:
            out.append(("V", repr(leaf)))
    return tuple(out)


class GraphedCallable:
    """Replays `fn(*args, **kwargs)` as CUDA graphs, one per call signature (tensor shapes,
    dtypes, strides and non-tensor values) and `key_fn()` (the stage: processors, NTK factor).

    A new signature is run `warmup_runs` times eagerly on a side stream (torch.compile and
    Triton autotuning happen there, outside capture), then captured. Calls copy their tensors
    into the captured inputs, replay, and return a clone of the output (graphs share one memory
    pool, so a later capture may reuse an earlier graph's intermediates; the clone keeps every
    returned value independent)."""

    def __init__(self, fn: Callable, key_fn: Callable[[], Any] = lambda: None, warmup_runs: int = 2):
        self.fn = fn
        self.key_fn = key_fn
        self.warmup_runs = warmup_runs
        self.graphs: dict[tuple, _Graph] = {}
        self._pool = None

    def __call__(self, *args, **kwargs):
        from torch.utils import _pytree as pytree

        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (self.key_fn(), _signature(leaves, spec))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, leaves, spec)
        else:
            for static, leaf in zip(entry.static_leaves, leaves):
                if isinstance(static, torch.Tensor):
                    static.copy_(leaf)
            entry.graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.static_output)

    def _capture(self, key, leaves, spec) -> _Graph:
        from torch.utils import _pytree as pytree

        start = time.perf_counter()
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_runs):
                self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = self.fn(*args, **kwargs)
        graph.replay()
        torch.cuda.synchronize()
        entry = _Graph(graph, static_leaves, static_output, time.perf_counter() - start)
        self.graphs[key] = entry
        return entry

    def stats(self) -> list[dict]:
        return [{"stage": key[0], "seconds": entry.seconds} for key, entry in self.graphs.items()]

    def release(self) -> None:
        self.graphs.clear()
        self._pool = None


# ---- the patch ----------------------------------------------------------------------------


class FastTransformerPatch:
    """Handle on a transformer under `fast_transformer`: stage switches and compile stats."""

    def __init__(self, transformer, original_processors, fast_processor: FastHiFlowAttnProcessor):
        self.transformer = transformer
        self._original_processors = original_processors
        self.processor = fast_processor
        self.pos_embed: FastNTKFluxPosEmbed = transformer.pos_embed
        self.mode = "base"
        self.graphs: GraphedCallable | None = None
        self.compiled = False
        self._first_call_seconds: dict[tuple, float] = {}
        self._base_processor: HiFlowAttnProcessor | None = None

    def use_parallel(self, run) -> None:
        """Run every stage under context parallelism `run` (hiflow_fast.parallel.ParallelRun).

        The base stage then uses HiFlow's processor with the standard 1/sqrt(d) scale and SDPA
        (the computation of diffusers' own processor) instead of the transformer's processors:
        diffusers' native backend has neither ring attention nor uneven lengths with both modes."""
        if self.processor.rope_in_attention or self.compiled or self.graphs is not None:
            raise HiFlowInputError("parallel", str(run.spec), "a fast path without rope_in_attention, compile or CUDA graphs")
        self.processor.use_parallel(run)
        self._base_processor = HiFlowAttnProcessor(proportional=False, attention="sdpa")
        self._base_processor.use_parallel(run)
        if self.mode == "base":
            self.use_base()

    def use_base(self) -> None:
        """Base stage: the transformer's own processors (HiFlow's standard-scale one under
        context parallelism), RoPE tables at theta x 1."""
        if self._base_processor is not None:
            self.transformer.set_attn_processor(self._base_processor)
        else:
            self.transformer.set_attn_processor(dict(self._original_processors))
        self.pos_embed.ntk_factor = 1.0
        self.pos_embed.fused = False
        self.mode = "base"

    def use_highres(self, ntk_factor: float) -> None:
        """High-res stage: fast HiFlow processors, fused NTK RoPE (theta x ntk_factor)."""
        self.transformer.set_attn_processor(self.processor)
        self.pos_embed.ntk_factor = float(ntk_factor)
        self.pos_embed.fused = True
        self.mode = "highres"

    def stage_key(self) -> tuple:
        return (self.mode, self.pos_embed.ntk_factor)

    def graph_stats(self) -> list[dict]:
        """Warm-up (compile + capture) seconds per captured signature (CUDA graphs only)."""
        return self.graphs.stats() if self.graphs is not None else []


def _original_forward(transformer):
    return transformer.__dict__.get("forward", type(transformer).forward.__get__(transformer))


@contextlib.contextmanager
def fast_transformer(
    transformer,
    *,
    proportional: bool = True,
    attention: str | None = None,
    kernels: str | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    rope_in_attention: bool = False,
    compile: bool = False,
    cuda_graphs: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str = "inductor",
) -> Iterator[FastTransformerPatch]:
    """Install the fast path on one FluxTransformer2DModel instance; restore it on exit.

    proportional / attention: as `patched_transformer` (attention: a name of
    hiflow_fast.attention_backends; None = $HIFLOW_ATTENTION or "sdpa").
    kernels: "triton", "ref" or "auto" for the fused q/k norm + RoPE (None = $HIFLOW_BACKEND or
    "auto": Triton on CUDA, the torch reference elsewhere).
    chunk_tokens: tokens per MLP chunk (None: no chunking).
    compile: torch.compile(fullgraph=True, dynamic=False, mode=compile_mode,
    backend=compile_backend) the forward; cuda_graphs (default: on CUDA when compiling) captures
    each call signature of each stage once and replays it (without compile: eager graphs).
    The patch starts in the base stage (`use_base`)."""
    if chunk_tokens is not None and (not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise HiFlowInputError("chunk_tokens", chunk_tokens, "a positive number of tokens, or None")
    try:
        device = next(transformer.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    kernel_name = resolve_kernels(kernels, device)
    if cuda_graphs is None:
        cuda_graphs = compile and device.type == "cuda"
    if cuda_graphs and device.type != "cuda":
        raise HiFlowInputError("cuda_graphs", cuda_graphs, f"False for a transformer on {device}")
    processor = FastHiFlowAttnProcessor(
        proportional=proportional, attention=attention, kernels=kernel_name, rope_in_attention=rope_in_attention
    )

    original_pos_embed = transformer.pos_embed
    original_processors = dict(transformer.attn_processors)
    had_forward = "forward" in transformer.__dict__
    saved_forward = transformer.__dict__.get("forward")
    patched_blocks = []
    transformer.pos_embed = FastNTKFluxPosEmbed.from_pos_embed(original_pos_embed, fused=False)
    try:
        for block in transformer.transformer_blocks:
            if _block_is_patchable(block):
                block.forward = functools.partial(_fast_double_block_forward, block, chunk_tokens=chunk_tokens)
                patched_blocks.append(block)
        for block in transformer.single_transformer_blocks:
            if _block_is_patchable(block):
                block.forward = functools.partial(_fast_single_block_forward, block, chunk_tokens=chunk_tokens)
                patched_blocks.append(block)
        patch = FastTransformerPatch(transformer, original_processors, processor)
        if compile or cuda_graphs:
            forward = _original_forward(transformer)
            if compile:
                options = {"mode": compile_mode} if compile_mode is not None else {}
                forward = torch.compile(forward, fullgraph=True, dynamic=False, backend=compile_backend, **options)
                patch.compiled = True
            if cuda_graphs:
                patch.graphs = GraphedCallable(forward, key_fn=patch.stage_key)
                forward = patch.graphs
            transformer.forward = forward
        patch.use_base()
        yield patch
    finally:
        for block in patched_blocks:
            vars(block).pop("forward", None)
        if had_forward:
            transformer.forward = saved_forward
        else:
            transformer.__dict__.pop("forward", None)
        transformer.pos_embed = original_pos_embed
        transformer.set_attn_processor(original_processors)
