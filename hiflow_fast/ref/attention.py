"""Attention helpers of the HiFlow transformer (reference).

* Proportional attention: softmax scale sqrt(log_4608(N) / d) with N the key length (text +
  image tokens) and d the head dim. 4608 = 4096 image + 512 text tokens, the sequence FLUX.1-dev
  was trained at, so the scale is 1/sqrt(d) there and grows slowly with N (entropy-preserving).
* Text duplication: the prompt tokens are repeated kh * kw times, kh = max(1, rows // 64),
  kw = max(1, cols // 64) over the token grid, copy (i, j) shifted by (64 i, 64 j) in the
  row and column position axes, so every 64 x 64 tile of image tokens sees a nearby prompt.
"""

from __future__ import annotations

import math

import torch

# Key length FLUX.1-dev was trained at: 64x64 image tokens + 512 text tokens.
TRAINING_KEY_LENGTH = 4608
# Token grid side of one 1024 px FLUX.1-dev image: the tile a text copy is placed on.
TEXT_TILE_TOKENS = 64


def proportional_attention_scale(key_length: int, head_dim: int) -> float:
    return math.sqrt(math.log(key_length, TRAINING_KEY_LENGTH) / head_dim)


def text_duplication_factors(grid_rows: int, grid_cols: int) -> tuple[int, int]:
    return max(1, grid_rows // TEXT_TILE_TOKENS), max(1, grid_cols // TEXT_TILE_TOKENS)


def duplicate_text(
    prompt_embeds: torch.Tensor, txt_ids: torch.Tensor, grid_rows: int, grid_cols: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat [B, T, D] prompt embeddings and [T, 3] ids over the (kh, kw) text tiles."""
    kh, kw = text_duplication_factors(grid_rows, grid_cols)
    if kh * kw == 1:
        return prompt_embeds, txt_ids
    ids = []
    for i in range(kh):
        for j in range(kw):
            shifted = txt_ids.clone()
            shifted[:, 1] += TEXT_TILE_TOKENS * i
            shifted[:, 2] += TEXT_TILE_TOKENS * j
            ids.append(shifted)
    return torch.cat([prompt_embeds] * (kh * kw), dim=1), torch.cat(ids, dim=0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain softmax attention on [B, S, H, D] in fp32 (the oracle for attention kernels)."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(qf @ kf.transpose(-1, -2) * scale, dim=-1)
    return (weights @ vf).transpose(1, 2).to(q.dtype)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention` and its row log-sum-exp: (out [B, S_q, H, D] in q's dtype, lse [B, S_q, H]
    fp32 with lse[b, s, h] = logsumexp_t(scale * q[b, s, h] . k[b, t, h]), natural log), the
    oracle for attention kernels that return the lse (ring attention merges chunks by it)."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    scores = qf @ kf.transpose(-1, -2) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.exp(scores - lse[..., None]) @ vf
    return out.transpose(1, 2).to(q.dtype), lse.transpose(1, 2).contiguous()
