"""HiFlow's changes to a diffusers Flux transformer, made per instance and undone afterwards.

* `NTKFluxPosEmbed` replaces `transformer.pos_embed`: the same float64 RoPE frequencies as
  diffusers' `FluxPosEmbed`, with theta multiplied by a settable `ntk_factor`.
* `HiFlowAttnProcessor` subclasses diffusers' `FluxAttnProcessor`: the same projections, norms
  and RoPE, with the softmax scale chosen per call (proportional attention) and the attention
  itself through the backend registry (`hiflow_fast.attention_backends`).
* `patched_transformer` applies both to one transformer instance and restores the original
  pos_embed module and attention processors on exit, whatever happens inside.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    FluxPosEmbed,
    _get_qkv_projections,
)

from .attention_backends import get_attention_backend
from .ref.attention import proportional_attention_scale
from .ref.rope import apply_rope


class NTKFluxPosEmbed(FluxPosEmbed):
    """Flux RoPE with theta scaled by `ntk_factor` on every axis (NTK-aware interpolation)."""

    def __init__(self, theta: int, axes_dim: list[int], ntk_factor: float = 1.0):
        super().__init__(theta=theta, axes_dim=axes_dim)
        self.ntk_factor = float(ntk_factor)

    @classmethod
    def from_pos_embed(cls, pos_embed: FluxPosEmbed, ntk_factor: float = 1.0) -> "NTKFluxPosEmbed":
        return cls(theta=pos_embed.theta, axes_dim=list(pos_embed.axes_dim), ntk_factor=ntk_factor)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float64 frequencies as diffusers' FluxPosEmbed (MPS has no float64).
        freqs_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
        pos = ids.float()
        cos_out, sin_out = [], []
        for axis, dim in enumerate(self.axes_dim):
            cos, sin = get_1d_rotary_pos_embed(
                dim,
                pos[:, axis],
                theta=self.theta * self.ntk_factor,
                repeat_interleave_real=True,
                use_real=True,
                freqs_dtype=freqs_dtype,
            )
            cos_out.append(cos)
            sin_out.append(sin)
        return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)


class HiFlowAttnProcessor(FluxAttnProcessor):
    """Flux attention with an optional proportional softmax scale and a pluggable backend.

    scale = sqrt(log_4608(N) / d) when `proportional` (N = key length), else 1/sqrt(d).
    """

    def __init__(self, proportional: bool = True, attention: str | None = None):
        super().__init__()
        self.proportional = proportional
        self.attention_name, self.attention_fn = get_attention_backend(attention)
        self.parallel = None  # a hiflow_fast.parallel.ParallelRun under context parallelism
        self._parallel_attention = None

    def use_parallel(self, run) -> None:
        """Attend through context parallelism `run` (a ParallelRun), or locally when None."""
        self.parallel = run
        self._parallel_attention = None if run is None else run.attention(self.attention_name, self.attention_fn)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention of the joint sequence [B, S, H, D]. Under context parallelism the tensors
        hold this rank's tokens, and the scale comes from the whole sequence's length."""
        head_dim = query.shape[-1]
        if self.parallel is None:
            return self.attention_fn(query, key, value, self.softmax_scale(key.shape[1], head_dim))
        return self._parallel_attention(query, key, value, self.softmax_scale(self.parallel.joint_tokens, head_dim))

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if attention_mask is not None:
            raise ValueError("HiFlowAttnProcessor does not support attention masks")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            cos, sin = image_rotary_emb
            query = apply_rope(query, cos, sin)
            key = apply_rope(key, cos, sin)
        hidden_states = self.attend(query, key, value)
        return self.project_out(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states)

    def softmax_scale(self, key_length: int, head_dim: int) -> float:
        """sqrt(log_4608(N) / d) when `proportional`, else 1/sqrt(d)."""
        if self.proportional:
            return proportional_attention_scale(key_length, head_dim)
        return 1.0 / math.sqrt(head_dim)

    @staticmethod
    def project_out(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
        """Flux's output projections of the attention output [B, S, H * D]: with text tokens,
        split it into (text, image) and return (image, text) each through its own projection."""
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


class TransformerPatch:
    """Handle on a patched transformer: switch between the base-stage and high-res settings."""

    def __init__(self, transformer, original_processors, proportional: bool, attention: str | None):
        self.transformer = transformer
        self._original_processors = original_processors
        self._hiflow_processor = HiFlowAttnProcessor(proportional=proportional, attention=attention)
        self.pos_embed: NTKFluxPosEmbed = transformer.pos_embed

    def use_base(self) -> None:
        """Base stage: the transformer's own processors and RoPE theta."""
        self.transformer.set_attn_processor(dict(self._original_processors))
        self.pos_embed.ntk_factor = 1.0

    def use_highres(self, ntk_factor: float) -> None:
        """High-res stage: HiFlow attention and NTK-scaled RoPE."""
        self.transformer.set_attn_processor(self._hiflow_processor)
        self.pos_embed.ntk_factor = float(ntk_factor)


@contextlib.contextmanager
def patched_transformer(
    transformer, *, proportional: bool = True, attention: str | None = None
) -> Iterator[TransformerPatch]:
    """Install HiFlow's pos_embed and processors on `transformer`; restore them on exit."""
    original_pos_embed = transformer.pos_embed
    original_processors = dict(transformer.attn_processors)
    transformer.pos_embed = NTKFluxPosEmbed.from_pos_embed(original_pos_embed)
    try:
        yield TransformerPatch(transformer, original_processors, proportional, attention)
    finally:
        transformer.pos_embed = original_pos_embed
        transformer.set_attn_processor(original_processors)
