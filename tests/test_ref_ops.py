"""The plain-PyTorch reference ops against independent formulations of the official math."""

import math

import pytest
import torch
import torch.nn.functional as F

from hiflow_fast import latents as L
from hiflow_fast import ref
from hiflow_fast.conformance import relative_l2


def _official_mask_loop(h, w, ratio, order=4):
    """The official per-pixel Python loop (float64 math stored as float32)."""
    mask = torch.zeros(h, w)
    for i in range(h):
        for j in range(w):
            d2 = (2 * i / h - 1) ** 2 + (2 * j / w - 1) ** 2
            mask[i, j] = 1 / (1 + (d2 / ratio**2) ** order)
    return mask


@pytest.mark.parametrize("h, w, ratio", [(66, 66, 0.2), (17, 30, 0.35), (9, 9, 0.5), (32, 20, 1.0)])
def test_butterworth_mask_equals_the_official_loop(h, w, ratio):
    assert torch.equal(ref.butterworth_lowpass_mask(h, w, ratio), _official_mask_loop(h, w, ratio))


def test_butterworth_zero_ratio_is_empty():
    assert not ref.butterworth_lowpass_mask(8, 8, 0.0).any()


@pytest.mark.parametrize("shape", [(2, 16, 64, 64), (1, 16, 66, 66), (2, 3, 17, 30), (1, 2, 9, 9), (1, 1, 12, 7)])
def test_rfft_blend_equals_the_official_two_fft_blend(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x0, reference = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    official = ref.spectral_lowpass_blend_official(x0.double(), reference.double(), 0.7, 0.3)
    ours = ref.spectral_lowpass_blend(x0, reference, 0.7, 0.3)
    assert relative_l2(ours, official) < 1e-6


def _haar_level1_lowpass(x):
    """Level-1 Haar analysis, detail bands zeroed, synthesis (even sizes), written out."""
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    ll = (a + b + c + d) / 2  # orthonormal approximation coefficient
    out = torch.empty_like(x)
    for rows, cols in ((0, 0), (0, 1), (1, 0), (1, 1)):
        out[..., rows::2, cols::2] = ll / 2
    return out


@pytest.mark.parametrize("shape", [(2, 16, 64, 64), (1, 3, 10, 14)])
def test_haar_lowpass_equals_the_wavelet_transform(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(ref.haar_lowpass(x).double(), _haar_level1_lowpass(x), atol=1e-6)


def test_haar_odd_size_keeps_the_lone_row_and_column():
    x = torch.randn(1, 1, 5, 3)
    y = ref.haar_lowpass(x)
    assert torch.allclose(y[..., 4, 2], x[..., 4, 2])
    assert torch.allclose(y[..., 0, 0], x[..., 0:2, 0:2].mean(dim=(-1, -2)))


def test_sharpen_matches_a_written_out_gaussian():
    img = torch.randn(2, 3, 11, 13, generator=torch.Generator().manual_seed(0))
    sigma = 1.3
    p = torch.tensor([math.exp(-1 / (2 * sigma**2)), 1.0, math.exp(-1 / (2 * sigma**2))])
    k = p / p.sum()
    padded = F.pad(img.double(), (1, 1, 1, 1), mode="reflect")
    blurred = sum(
        k[i] * k[j] * padded[..., i : i + 11, j : j + 13] for i in range(3) for j in range(3)
    )
    expected = 2 * img.double() - blurred
    assert relative_l2(ref.sharpen(img, sigma), expected) < 1e-6


def test_guided_velocity_update_formula():
    g = torch.Generator().manual_seed(1)
    x, x0, r, vp, vrp = (torch.randn(2, 4, 6, 6, generator=g) for _ in range(5))
    sigma, sigma_next, beta = 0.6, 0.45, 0.3
    x_next, v, v_ref = ref.guided_velocity_update(x, x0, r, sigma, sigma_next, beta, vp, vrp)
    v0 = (x - x0) / (sigma + 1e-6)
    vr = (x - r) / (sigma + 1e-6)
    expected_v = v0 + beta * ((vp - vrp) - (v0 - vr))
    assert torch.allclose(v, expected_v, atol=1e-5) and torch.allclose(v_ref, vr)
    assert torch.allclose(x_next, x + (sigma_next - sigma) * expected_v, atol=1e-5)
    first, v_first, _ = ref.guided_velocity_update(x, x0, r, sigma, sigma_next, beta)
    assert torch.allclose(v_first, v0)


@pytest.mark.parametrize("h, w", [(4, 6), (8, 8), (16, 2)])
def test_pack_unpack_and_swin_round_trips(h, w):
    x = torch.randn(2, 16, h, w)
    assert torch.equal(L.unpack(L.pack(x), h, w), x)
    padded = L.swin_pad_packed(L.pack(x), h, w)
    assert padded.shape == (2, (h // 2 + 1) * (w // 2 + 1), 64)
    assert torch.equal(L.swin_crop_packed(padded, h + 2, w + 2), L.pack(x))
    # Packed feature 4c + 2dy + dx holds channel c of patch pixel (dy, dx).
    assert torch.equal(L.pack(x)[:, 0, 4 * 3 + 2 * 1 + 0], x[:, 3, 1, 0])


def test_image_ids_are_row_major():
    ids = L.image_ids(4, 6)
    assert ids.shape == (6, 3)
    assert ids[4].tolist() == [0.0, 1.0, 1.0]


def test_rope_matches_diffusers_flux_pos_embed_with_scaled_theta():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    ids = torch.cat([torch.zeros(5, 3), L.image_ids(18, 22)], dim=0)
    cos, sin = ref.ntk_rope_cos_sin(ids, (4, 6, 6), theta=10000, ntk_factor=7.0)
    cos_d, sin_d = FluxPosEmbed(theta=70000, axes_dim=[4, 6, 6])(ids)
    assert torch.equal(cos, cos_d) and torch.equal(sin, sin_d)


def test_ntk_pos_embed_subclass(tiny_pipe):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    from hiflow_fast.transformer import NTKFluxPosEmbed

    ids = L.image_ids(10, 12)
    ntk = NTKFluxPosEmbed(theta=10000, axes_dim=[4, 6, 6], ntk_factor=3.0)
    for a, b in zip(ntk(ids), FluxPosEmbed(theta=30000, axes_dim=[4, 6, 6])(ids)):
        assert torch.equal(a, b)


def test_proportional_attention_scale():
    assert ref.proportional_attention_scale(4608, 128) == pytest.approx(1 / math.sqrt(128))
    assert ref.proportional_attention_scale(66048, 128) == pytest.approx(math.sqrt(math.log(66048) / math.log(4608) / 128))


def test_text_duplication_tiles_and_shifts_the_prompt():
    embeds = torch.randn(2, 3, 8)
    ids = torch.zeros(3, 3)
    same = ref.duplicate_text(embeds, ids, 65, 65)
    assert same[0] is embeds  # one tile up to a 64x64 token grid (65 padded)
    dup, dup_ids = ref.duplicate_text(embeds, ids, 128, 200)
    assert ref.text_duplication_factors(128, 200) == (2, 3)
    assert dup.shape == (2, 18, 8) and torch.equal(dup[:, 3:6], embeds)
    assert dup_ids[3 * 4].tolist() == [0.0, 64.0, 64.0]  # copy (1, 1)
    assert dup_ids[3 * 5].tolist() == [0.0, 64.0, 128.0]  # copy (1, 2)


def test_latent_reference_is_pytorch_bicubic():
    x = torch.randn(1, 16, 6, 10)
    up = ref.latent_reference(L.pack(x), (6, 10), (14, 18))
    assert torch.equal(up, F.interpolate(x, size=(14, 18), mode="bicubic", align_corners=False))
    assert torch.equal(ref.latent_reference(L.pack(x), (6, 10), (6, 10)), x)
