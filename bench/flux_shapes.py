"""FLUX.1-dev-shaped models with random weights, and the FLOPs they cost.

Real FLUX.1-dev weights cannot be downloaded here, and the cost of a forward pass does not
depend on the values of the weights, so the benchmarks build the same architectures with
random weights. Nothing is downloaded.

Sizes (`MODEL_SIZES`):

* ``full``: FLUX.1-dev's transformer (19 double + 38 single blocks, hidden 3072 = 24 heads x 128,
  joint_attention_dim 4096, pooled 768, RoPE axes 16/56/56, guidance embedding; 11.9 B
  parameters, 23.8 GB in bf16) and VAE (16 latent channels, blocks 128/256/512/512, 2 layers
  per block, scaling 0.3611, shift 0.1159, 1024-pixel tiles);
* ``reduced``: the same architectures, small enough for a 2-core CPU (2 + 2 blocks, hidden 256;
  VAE blocks 16/32/32/32, 1 layer per block, 128-pixel tiles so that tiling really tiles at CPU
  image sizes);
* ``tiny``: smaller still, for smoke tests (seconds).

Every size keeps FLUX's interfaces (64 packed input features, 4096-wide text embeddings, 768-wide
pooled embeddings, 16 latent channels, 8x VAE downsampling), so the pipeline code runs unchanged.

Weights are initialised cheaply: the module is built on the meta device (no memory, no init
kernels), cast there, materialised on the target device in its dtype with `to_empty`, and filled
in place: linear and
conv weights ~ N(0, 1/fan_in) (variance preserving, so 57 random blocks stay finite in bf16),
biases 0, norm scales 1.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

import torch

# ---- configurations -------------------------------------------------------------------------

FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x a 2x2 patch
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,  # T5-XXL width
    pooled_projection_dim=768,  # CLIP-L pooled width
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

FLUX_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    act_fn="silu",
    sample_size=1024,  # the tile size (pixels) of diffusers' tiled decode/encode
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    force_upcast=True,
)


@dataclass(frozen=True)
class ModelSize:
    """One size of the benchmark models: transformer and VAE configs and the prompt length."""

    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    text_tokens: int  # prompt tokens given to the transformer (FLUX.1-dev: 512, T5's max length)
    description: str


MODEL_SIZES: dict[str, ModelSize] = {
    "full": ModelSize(
        "full", FLUX_DEV_TRANSFORMER, FLUX_VAE, 512, "FLUX.1-dev shapes (11.9 B transformer, 84 M VAE), random weights"
    ),
    "reduced": ModelSize(
        "reduced",
        # 4 heads x 64 = hidden 256; RoPE axes must sum to the head dim (8 + 28 + 28 = 64).
        dict(FLUX_DEV_TRANSFORMER, num_layers=2, num_single_layers=2, attention_head_dim=64,
             num_attention_heads=4, axes_dims_rope=(8, 28, 28)),
        # 16 groups divide every width; 128-pixel tiles (16 latent pixels) so tiling engages at CPU sizes.
        dict(FLUX_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=128),
        64,
        "FLUX-shaped, reduced for a CPU (2+2 blocks, hidden 256; VAE 16/32/32/32)",
    ),
    "tiny": ModelSize(
        "tiny",
        # 2 heads x 32 = hidden 64; RoPE axes 8 + 12 + 12 = 32.
        dict(FLUX_DEV_TRANSFORMER, num_layers=1, num_single_layers=1, attention_head_dim=32,
             num_attention_heads=2, axes_dims_rope=(8, 12, 12)),
        # 64-pixel tiles: the smoke sizes (>= 128 px) go through diffusers' tiled path too.
        dict(FLUX_VAE, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8, sample_size=64),
        16,
        "FLUX-shaped, tiny (1+1 blocks, hidden 64; VAE 8/8/16/16), for smoke tests",
    ),
}


def model_size(name: str) -> ModelSize:
    from hiflow_fast.errors import HiFlowInputError

    if name not in MODEL_SIZES:
        raise HiFlowInputError("--model", name, f"one of {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]


# ---- construction ---------------------------------------------------------------------------


@torch.no_grad()
def init_random_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter in place: weights with fan-in > 1 ~ N(0, 1/fan_in), 1-D norm scales 1,
    biases 0. Draws on the parameters' own device (a GPU fills 24 GB in well under a second)."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            param.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
        elif name.endswith("bias"):
            param.zero_()
        else:  # RMSNorm / GroupNorm / LayerNorm scales
            param.fill_(1.0)
    for buffer in module.buffers():  # none in these models today; keep any future one defined
        if buffer.is_floating_point():
            buffer.zero_()
    return module


def _keep_fp32_tensors(model: torch.nn.Module) -> None:
    """Put back in fp32 the parameters and buffers a diffusers model asks to keep there, by
    from_pretrained's rule: a tensor whose dotted name has an entry of `_keep_in_fp32_modules`
    as one of its parts (an entry may name a module or a bare parameter)."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or ()
    keep = {keep} if isinstance(keep, str) else set(keep)
    if not keep:
        return
    for tensors in ("_parameters", "_buffers"):
        for module_name, module in model.named_modules():
            for leaf, tensor in getattr(module, tensors).items():
                name = f"{module_name}.{leaf}" if module_name else leaf
                if tensor is None or not tensor.is_floating_point() or not keep.intersection(name.split(".")):
                    continue
                cast = tensor.to(torch.float32)
                getattr(module, tensors)[leaf] = (
                    torch.nn.Parameter(cast, requires_grad=tensor.requires_grad) if tensors == "_parameters" else cast
                )


def _materialise(cls, config: dict[str, Any], device, dtype: torch.dtype, seed: int):
    with torch.device("meta"):
        model = cls(**config)
    # Cast on meta, then allocate: the weights are created once, in `dtype` (an fp32 copy of
    # FLUX.1-dev would need 48 GB on the GPU before the cast). The cast is torch's own: diffusers'
    # `ModelMixin.to(dtype)` logs a warning about fp32-kept modules even when there are none.
    torch.nn.Module.to(model, dtype)
    _keep_fp32_tensors(model)
    model = model.to_empty(device=device)
    init_random_(model, seed)
    return model.eval().requires_grad_(False)


def build_transformer(size: ModelSize | str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A FluxTransformer2DModel of `size` with random weights on `device` in `dtype`."""
    from diffusers import FluxTransformer2DModel

    size = model_size(size) if isinstance(size, str) else size
    return _materialise(FluxTransformer2DModel, size.transformer, device, dtype, seed)


def build_vae(size: ModelSize | str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 1):
    """An AutoencoderKL of `size` (FLUX VAE layout) with random weights on `device` in `dtype`."""
    from diffusers import AutoencoderKL

    size = model_size(size) if isinstance(size, str) else size
    return _materialise(AutoencoderKL, size.vae, device, dtype, seed)


def flux_scheduler():
    """FLUX.1-dev's FlowMatchEulerDiscreteScheduler configuration (the one of the embedded model)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )


def random_prompt(size: ModelSize | str, device="cpu", dtype: torch.dtype = torch.float32, seed: int = 2, batch: int = 1):
    """(prompt_embeds [B, T, 4096], pooled [B, 768]) ~ N(0, 1): what the text encoders would give.
    Text encoding is not part of any benchmark."""
    size = model_size(size) if isinstance(size, str) else size
    g = torch.Generator().manual_seed(seed)
    cfg = size.transformer
    embeds = torch.randn(batch, size.text_tokens, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g)
    return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)


def parameter_count(config: dict[str, Any], kind: str = "transformer") -> int:
    """Parameters of a config, counted on the meta device (no memory)."""
    return _parameter_count(kind, json.dumps(_jsonable(config), sort_keys=True))


@functools.lru_cache(maxsize=16)
def _parameter_count(kind: str, config_json: str) -> int:
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    cls = FluxTransformer2DModel if kind == "transformer" else AutoencoderKL
    with torch.device("meta"):
        model = cls(**json.loads(config_json))
    return sum(p.numel() for p in model.parameters())


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# ---- FLOPs ----------------------------------------------------------------------------------

# FLUX blocks widen the MLP 4x (FeedForward mult=4 in double blocks, mlp_ratio=4 in single blocks).
MLP_RATIO = 4
# Sinusoidal width of the timestep / guidance projections (diffusers' Timesteps(256, ...)).
TIME_PROJ_DIM = 256


def transformer_step_flops(config: dict[str, Any], image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """FLOPs of one transformer forward (multiply-add = 2 FLOPs).

    Per block and token: q, k, v and out projections (4 d^2 MACs) and the MLP (2 x 4 d^2 MACs)
    = 24 d^2 FLOPs (a single block fuses the same matmuls: qkv + up-projection d -> 7d, then
    5d -> d); attention QK^T and PV: 4 d L^2 FLOPs over the joint sequence of L tokens. For
    FLUX.1-dev (57 blocks, d = 3072) that is 57 (24 d^2 L + 4 d L^2). Added: the token embedders
    and output projection, and the per-sample adaLN modulation and conditioning embedders
    (~0.03 % at 1024^2). Elementwise work (norms, RoPE, GELU) is not counted: it is not matmul
    work and is small beside it.
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    length = image_tokens + text_tokens
    blocks = config["num_layers"] + config["num_single_layers"]
    per_block = 2 * (4 + 2 * MLP_RATIO) * d * d * length + 4 * d * length * length
    out_features = config["patch_size"] ** 2 * (config.get("out_channels") or config["in_channels"])
    tokens = 2 * config["in_channels"] * d * image_tokens + 2 * config["joint_attention_dim"] * d * text_tokens
    tokens += 2 * d * out_features * image_tokens
    # adaLN: double blocks modulate both streams (d -> 6d each), single blocks d -> 3d, the
    # output norm d -> 2d; conditioning: timestep (+ guidance) 256 -> d -> d, pooled 768 -> d -> d.
    per_sample = 2 * d * (config["num_layers"] * 2 * 6 * d + config["num_single_layers"] * 3 * d + 2 * d)
    embedders = 2 if config.get("guidance_embeds") else 1
    per_sample += embedders * 2 * (TIME_PROJ_DIM * d + d * d) + 2 * (config["pooled_projection_dim"] * d + d * d)
    return batch * (blocks * per_block + tokens + per_sample)


def image_tokens(latent_h: int, latent_w: int) -> int:
    """Tokens of a latent grid: one per 2x2 latent patch."""
    return (latent_h // 2) * (latent_w // 2)


def vae_flops(config: dict[str, Any], op: str, height: int, width: int, *, tiled: bool = False, batch: int = 1) -> int:
    """Matmul/conv/attention FLOPs of one VAE `op` ("decode" or "encode") of a height x width
    image (pixels), as diffusers runs it with tiling on or off.

    One untiled pass is counted exactly by torch.utils.flop_counter on the meta device (no
    memory, no compute). A tiled pass is the sum over diffusers' tiles (same loops as
    `AutoencoderKL.tiled_decode` / `_tiled_encode`: tiles of `sample_size` pixels every 75 % of
    a tile); it differs from untiled: overlapping tiles repeat convolutions, and the mid-block
    attention is local to a tile (much cheaper at 4K)."""
    key = json.dumps(_jsonable(config), sort_keys=True)
    tiles = vae_tiles(config, op, height, width) if tiled else [(height, width)]
    return batch * sum(_vae_pass_flops(key, op, th, tw) for th, tw in tiles)


def vae_tiles(config: dict[str, Any], op: str, height: int, width: int) -> list[tuple[int, int]]:
    """The (height, width) in pixels of each tile diffusers' tiled VAE `op` runs on a height x
    width image, in its loop order (rows, then columns; `AutoencoderKL.tiled_decode` /
    `_tiled_encode`: tiles of `sample_size` pixels every 75 % of a tile); one tile, the whole
    image, where tiling does not engage."""
    if op not in ("decode", "encode"):
        raise ValueError(f"op={op!r}: expected 'decode' or 'encode'")
    down = 2 ** (len(config["block_out_channels"]) - 1)
    # The grid the op tiles over: latent pixels for decode, image pixels for encode.
    scale = down if op == "decode" else 1
    rows, cols = height // scale, width // scale
    tile = config["sample_size"] // scale
    if rows <= tile and cols <= tile:
        return [(rows * scale, cols * scale)]
    stride = int(tile * (1 - VAE_TILE_OVERLAP))
    return [(min(tile, rows - i) * scale, min(tile, cols - j) * scale)
            for i in range(0, rows, stride) for j in range(0, cols, stride)]


# diffusers' AutoencoderKL.tile_overlap_factor: neighbouring tiles overlap by a quarter tile.
VAE_TILE_OVERLAP = 0.25


@functools.lru_cache(maxsize=64)
def _vae_pass_flops(config_json: str, op: str, height: int, width: int) -> int:
    """FLOPs of one untiled encoder or decoder pass over a height x width image."""
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    config = json.loads(config_json)
    with torch.device("meta"):
        vae = AutoencoderKL(**config)
    down = 2 ** (len(config["block_out_channels"]) - 1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if op == "decode":
            z = torch.empty(1, config["latent_channels"], height // down, width // down, device="meta")
            vae.decode(z, return_dict=False)
        else:
            x = torch.empty(1, config["in_channels"], height, width, device="meta")
            vae.encode(x).latent_dist.mode()
    return int(counter.get_total_flops())
