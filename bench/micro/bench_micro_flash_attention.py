"""hiflow_fast::flash_attention vs its reference (softmax attention, fp32 math)."""

import math

import pytest
import torch

from hiflow_fast.ops.flash_attention import flash_attention
from hiflow_fast.ref.attention import attention

# (batch, tokens, heads, head dim): Flux at 1K on a GPU (4096 image + 512 text tokens, 24 heads
# of 128); the reference materialises every score, so larger sizes only measure its memory.
SHAPES = {"tiny": (1, 32, 2, 32), "cpu": (1, 256, 2, 64), "flux": (1, 4608, 24, 128)}


@pytest.mark.parametrize("path", ["triton", "ref"])
def test_flash_attention(benchmark, micro, size, path):
    batch, seq, heads, head_dim = SHAPES[size]
    dtype = torch.bfloat16 if micro.device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, seq, heads, head_dim, generator=g).to(micro.device, dtype) for _ in range(3))
    scale = 1.0 / math.sqrt(head_dim)
    impl = flash_attention if path == "triton" else attention

    def fn():
        return impl(q, k, v, scale)

    flops = 4.0 * batch * heads * seq * seq * head_dim  # q k^T and p v
    nbytes = 4 * q.numel() * q.element_size()  # reads q, k, v; writes the output
    micro.run(
        benchmark, "flash_attention", path, fn, nbytes=nbytes, flops=flops, dtype=dtype,
        batch=batch, tokens=seq, heads=heads, head_dim=head_dim,
    )
