"""hiflow_fast::qk_norm_rope vs its reference: q/k RMSNorm + NTK-scaled RoPE."""

import pytest
import torch

from hiflow_fast.ops.qk_norm_rope import qk_norm_rope
from hiflow_fast.ref.qk_norm_rope import qk_norm_rope as qk_norm_rope_ref

# (batch, text tokens, image grid rows x cols, heads, head dim, RoPE axes): Flux at 2K on a GPU
# (512 text tokens + 128 x 128 image tokens, 24 heads of 128).
SHAPES = {
    "tiny": (1, 8, (4, 4), 2, 32, (8, 12, 12)),
    "cpu": (1, 32, (16, 16), 4, 128, (16, 56, 56)),
    "flux": (1, 512, (128, 128), 24, 128, (16, 56, 56)),
}
THETA, NTK, EPS = 10000.0, 4.0, 1e-6


def token_ids(n_txt: int, rows: int, cols: int) -> torch.Tensor:
    """Flux's position ids: zeros for the text, (0, row, col) for the image tokens."""
    image = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
    ids = torch.zeros(n_txt + rows * cols, 3)
    ids[n_txt:, 1:] = image.float()
    return ids


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_qk_norm_rope(benchmark, micro, size, path):
    batch, n_txt, (rows, cols), heads, head_dim, axes = SHAPES[size]
    dtype = torch.bfloat16 if micro.device.type == "cuda" else torch.float32
    seq = n_txt + rows * cols
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(batch, seq, heads, head_dim, generator=g).to(micro.device, dtype) for _ in range(2))
    q_weight, k_weight = (1.0 + 0.1 * torch.randn(head_dim, generator=g).to(micro.device, dtype) for _ in range(2))
    ids = token_ids(n_txt, rows, cols).to(micro.device)
    impl = qk_norm_rope if path == "triton" else qk_norm_rope_ref

    def fn():
        return impl(q, k, q_weight, k_weight, ids, axes, THETA, NTK, EPS)

    nbytes = 4 * q.numel() * q.element_size()  # reads q, k; writes both
    micro.run(benchmark, "qk_norm_rope", path, fn, nbytes=nbytes, dtype=dtype, batch=batch, tokens=seq, heads=heads, head_dim=head_dim)
