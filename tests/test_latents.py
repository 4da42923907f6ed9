"""hiflow_fast.latents: the fast layout copies equal the plain pack / unpack / swin pad and crop
bit for bit (they are copies), on odd, non-square grids, batch 2 and every float dtype."""

from __future__ import annotations

import pytest
import torch

from hiflow_fast import latents as L

# (h, w) latent grids: h/2 and w/2 odd and even, square and not.
GRIDS = [(10, 14), (6, 6), (18, 10), (2, 4)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_into_equals_unpack(hw, dtype):
    packed = _random((2, (hw[0] // 2) * (hw[1] // 2), 12), seed=hw[0] * 100 + hw[1], dtype=dtype)
    out = torch.full((2, 3, *hw), float("nan"), dtype=dtype)
    assert L.unpack_into(out, packed) is out
    assert torch.equal(out, L.unpack(packed, *hw))


@pytest.mark.parametrize("hw", GRIDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_scratch", [False, True])
def test_pack_into_equals_pack_and_converts_once(hw, dtype, with_scratch):
    """fp32 [B, C, h, w] (here a non-contiguous view) packed into `dtype`: one rounding."""
    base = _random((2, 3, hw[0] + 2, hw[1] + 2), seed=hw[0] * 10 + hw[1])
    unpacked = base[..., 1:-1, 1:-1]
    out = torch.full((2, (hw[0] // 2) * (hw[1] // 2), 12), float("nan"), dtype=dtype)
    scratch = torch.full((out.numel() + 5,), float("nan"), dtype=dtype) if with_scratch else None
    assert L.pack_into(out, unpacked, scratch=scratch) is out
    assert torch.equal(out, L.pack(unpacked).to(dtype))


@pytest.mark.parametrize("hw", GRIDS[:3])
@pytest.mark.parametrize("direction", ["pad", "crop"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swin_move_into_equals_unpack_pad_pack(hw, direction, dtype):
    """The phase-copy swin move equals the official unpack -> F.pad/slice -> pack, with the pad
    ring zero even where the output buffer held garbage."""
    latents = _random((2, (hw[0] // 2) * (hw[1] // 2), 12), seed=100 * hw[0] + hw[1] + (direction == "pad"))
    if direction == "pad":
        want, out_hw = L.swin_pad_packed(latents, *hw), (hw[0] + 2, hw[1] + 2)
    else:
        want, out_hw = L.swin_crop_packed(latents, *hw), (hw[0] - 2, hw[1] - 2)
    out = torch.full((2, (out_hw[0] // 2) * (out_hw[1] // 2), 12), float("nan"), dtype=dtype)
    assert L.swin_move_into(out, latents, hw) is out
    assert torch.equal(out, want.to(dtype))
