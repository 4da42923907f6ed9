"""Attention backends for the HiFlow transformer: a registry of names with constraints.

Every backend takes q, k, v as [B, S, H, D] and a softmax scale and returns [B, S, H, D]
(HiFlow's proportional attention passes its own scale). In the style of diffusers'
`attention_dispatch`, each backend declares its constraints (dtypes, head dims, devices) and
whether it can run here; availability is decided once, on first use, and cached.

    name              what runs                                          constraints
    sdpa (default)    torch SDPA, torch picks the kernel                 any
    sdpa-flash        SDPA forced to its FlashAttention kernel           fp16/bf16 on CUDA (fp32 too on CPU), D <= 256, D % 8 == 0
    sdpa-cudnn        SDPA forced to cuDNN attention                     CUDA, fp16/bf16, D <= 128, D % 8 == 0
    sdpa-efficient    SDPA forced to memory-efficient attention          CUDA, D % 8 == 0
    sdpa-math         SDPA forced to the math (reference) kernel         any
    triton            ours: hiflow_fast::flash_attention                 CUDA (or CPU with TRITON_INTERPRET=1), 16 <= D <= 256
    flash, _flash_3,  diffusers' dispatch backends, registered only      CUDA, fp16/bf16
    sage, xformers    when their packages (flash-attn, FA3,
                      sageattention, xformers) are installed

Selection: the `name` argument, else the environment variable HIFLOW_ATTENTION, else "sdpa".
A name that is unknown or not available here, or a call whose tensors break the backend's
constraints, raises HiFlowInputError naming the field, the value and what is allowed -- never a
silent fallback. "sdpa" is the same call as diffusers' native backend (bit-identical on CPU).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .errors import HiFlowInputError

ENV_VAR = "HIFLOW_ATTENTION"
DEFAULT_BACKEND = "sdpa"
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]

_HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class AttentionBackend:
    """One registered backend: its function, its constraints and where it can run.

    `available()` says whether it can run on this machine (decided once); `unavailable_reason`
    why not. `check(q, k, v)` raises HiFlowInputError when the tensors break a constraint."""

    name: str
    fn: AttentionFn
    description: str
    dtypes: tuple[torch.dtype, ...] = _FLOATS
    # dtypes allowed per device type where they differ from `dtypes` (e.g. fp32 on CPU only).
    dtypes_by_device: dict[str, tuple[torch.dtype, ...]] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu", "cuda")
    min_head_dim: int = 1
    max_head_dim: int | None = None
    head_dim_multiple: int = 1
    probe: Callable[[], str | None] = field(default=lambda: None)

    def unavailable_reason(self) -> str | None:
        """None when the backend can run here, else a sentence saying what is missing."""
        return _probe(self.name)

    def available(self) -> bool:
        return self.unavailable_reason() is None

    def check(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        where = f"(attention backend {self.name!r})"
        device = q.device.type
        if device not in self.devices:
            raise HiFlowInputError(f"query.device {where}", q.device, f"a device of type {' or '.join(self.devices)}")
        allowed = self.dtypes_by_device.get(device, self.dtypes)
        if q.dtype not in allowed:
            raise HiFlowInputError(f"query.dtype {where}", q.dtype, ", ".join(str(d) for d in allowed))
        if k.dtype != q.dtype or v.dtype != q.dtype:
            raise HiFlowInputError(f"key/value dtype {where}", (k.dtype, v.dtype), f"the dtype of query, {q.dtype}")
        head_dim = q.shape[-1]
        if (
            head_dim < self.min_head_dim
            or (self.max_head_dim is not None and head_dim > self.max_head_dim)
            or head_dim % self.head_dim_multiple
        ):
            raise HiFlowInputError(f"head_dim {where}", head_dim, self.head_dim_text())

    def head_dim_text(self) -> str:
        text = f"{self.min_head_dim} to {self.max_head_dim if self.max_head_dim is not None else 'any size'}"
        if self.head_dim_multiple > 1:
            text += f", a multiple of {self.head_dim_multiple}"
        return text


_REGISTRY: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    """Add (or replace) a backend under `backend.name`."""
    _REGISTRY[backend.name] = backend
    _probe.cache_clear()
    return backend


@functools.lru_cache(maxsize=None)
def _probe(name: str) -> str | None:
    """Availability, decided once per backend (the cache is cleared only by registration)."""
    try:
        return _REGISTRY[name].probe()
    except Exception as exc:  # a broken optional install is "not available", with the reason
        return f"probing it failed: {type(exc).__name__}: {exc}"


# ---- PyTorch SDPA ------------------------------------------------------------------------


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # The same call as diffusers' native backend (permute, SDPA, permute back).
    out = F.scaled_dot_product_attention(
        q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3), scale=scale
    )
    return out.permute(0, 2, 1, 3)


def _forced_sdpa(kernel_name: str) -> AttentionFn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, kernel_name)):
            return _sdpa(q, k, v, scale)

    fn.__name__ = f"sdpa_{kernel_name.lower()}"
    return fn


def _needs_cuda() -> str | None:
    return None if torch.cuda.is_available() else "no CUDA device"


def _probe_sdpa_flash() -> str | None:
    return None  # CPU always has it; CUDA needs it compiled in (checked per call below)


def _sdpa_flash(q, k, v, scale):
    if q.device.type == "cuda" and not torch.backends.cuda.is_flash_attention_available():
        raise HiFlowInputError("attention", "sdpa-flash", "another backend: this torch build has no CUDA flash SDPA")
    return _forced_sdpa("FLASH_ATTENTION")(q, k, v, scale)


def _probe_cudnn() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not torch.backends.cudnn.is_available():
        return "cuDNN is not available in this torch build"
    return None


# ---- ours: Triton ------------------------------------------------------------------------


def _probe_triton() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "no CUDA device (set TRITON_INTERPRET=1 before triton is imported to use Triton's CPU interpreter)"
    return None


def _triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from .ops.flash_attention import flash_attention

    return flash_attention(q, k, v, scale)


# ---- diffusers' dispatch backends --------------------------------------------------------


def _diffusers_backend(dispatch_name: str) -> AttentionFn:
    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

        return dispatch_attention_fn(q, k, v, scale=scale, backend=AttentionBackendName(dispatch_name))

    fn.__name__ = f"diffusers_{dispatch_name.strip('_')}"
    return fn


def _diffusers_probe(flag: str, package: str) -> Callable[[], str | None]:
    def probe() -> str | None:
        if not torch.cuda.is_available():
            return "no CUDA device"
        from diffusers.models import attention_dispatch

        if not getattr(attention_dispatch, flag, False):
            return f"{package} is not installed (or too old for diffusers)"
        return None

    return probe


# Registered up front so that asking for them names what is missing; `available_backends()`
# lists only those that can run here.
for _backend in (
    AttentionBackend("sdpa", _sdpa, "torch SDPA; torch chooses the kernel for the device"),
    AttentionBackend(
        "sdpa-flash",
        _sdpa_flash,
        "torch SDPA forced to FlashAttention (CPU: torch's flash kernel)",
        dtypes=_HALF,
        dtypes_by_device={"cpu": _FLOATS},
        max_head_dim=256,
        head_dim_multiple=8,
        probe=_probe_sdpa_flash,
    ),
    AttentionBackend(
        "sdpa-cudnn",
        _forced_sdpa("CUDNN_ATTENTION"),
        "torch SDPA forced to cuDNN attention",
        dtypes=_HALF,
        devices=("cuda",),
        max_head_dim=128,
        head_dim_multiple=8,
        probe=_probe_cudnn,
    ),
    AttentionBackend(
        "sdpa-efficient",
        _forced_sdpa("EFFICIENT_ATTENTION"),
        "torch SDPA forced to memory-efficient attention",
        devices=("cuda",),
        head_dim_multiple=8,
        probe=_needs_cuda,
    ),
    AttentionBackend("sdpa-math", _forced_sdpa("MATH"), "torch SDPA forced to the math kernel"),
    AttentionBackend(
        "triton",
        _triton_attention,
        "hiflow_fast::flash_attention, our tiled Triton kernel",
        min_head_dim=16,
        max_head_dim=256,
        probe=_probe_triton,
    ),
    AttentionBackend(
        "flash",
        _diffusers_backend("flash"),
        "diffusers dispatch: flash-attn 2",
        dtypes=_HALF,
        devices=("cuda",),
        max_head_dim=256,
        probe=_diffusers_probe("_CAN_USE_FLASH_ATTN", "flash-attn"),
    ),
    AttentionBackend(
        "_flash_3",
        _diffusers_backend("_flash_3"),
        "diffusers dispatch: FlashAttention-3 (Hopper)",
        dtypes=_HALF,
        devices=("cuda",),
        max_head_dim=256,
        probe=_diffusers_probe("_CAN_USE_FLASH_ATTN_3", "flash_attn_interface (FlashAttention-3)"),
    ),
    AttentionBackend(
        "sage",
        _diffusers_backend("sage"),
        "diffusers dispatch: SageAttention (8-bit QK)",
        dtypes=_HALF,
        devices=("cuda",),
        probe=_diffusers_probe("_CAN_USE_SAGE_ATTN", "sageattention"),
    ),
    AttentionBackend(
        "xformers",
        _diffusers_backend("xformers"),
        "diffusers dispatch: xformers memory-efficient attention",
        devices=("cuda",),
        probe=_diffusers_probe("_CAN_USE_XFORMERS_ATTN", "xformers"),
    ),
):
    register_backend(_backend)


def registered_backends() -> list[str]:
    """Every known name, available here or not."""
    return sorted(_REGISTRY)


def available_backends() -> list[str]:
    """The names that can run on this machine (decided once)."""
    return sorted(name for name, backend in _REGISTRY.items() if backend.available())


def backend_info(name: str) -> AttentionBackend:
    """The registry entry for `name` (KeyError if unknown)."""
    return _REGISTRY[name]


def resolve_backend_name(name: str | None = None) -> str:
    """The chosen name: argument, then $HIFLOW_ATTENTION, then "sdpa"; validated."""
    if name is not None:
        field_name, chosen = "attention", name
    elif os.environ.get(ENV_VAR):
        field_name, chosen = ENV_VAR, os.environ[ENV_VAR]
    else:
        field_name, chosen = "attention", DEFAULT_BACKEND
    allowed = ", ".join(available_backends())
    if not isinstance(chosen, str) or chosen not in _REGISTRY:
        raise HiFlowInputError(field_name, chosen, f"one of the available backends: {allowed}")
    reason = _REGISTRY[chosen].unavailable_reason()
    if reason is not None:
        raise HiFlowInputError(field_name, chosen, f"a backend available here ({reason}); available: {allowed}")
    return chosen


def get_attention_backend(name: str | None = None) -> tuple[str, AttentionFn]:
    """(name, fn) for a backend name (argument, then $HIFLOW_ATTENTION, then "sdpa").

    fn(q, k, v, scale) checks the backend's constraints on every call (a few attribute reads,
    static under torch.compile) and raises HiFlowInputError when they fail."""
    chosen = resolve_backend_name(name)
    backend = _REGISTRY[chosen]

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        backend.check(q, k, v)
        return backend.fn(q, k, v, scale)

    attention.__name__ = f"attention_{chosen.replace('-', '_').strip('_')}"
    attention.backend = backend  # type: ignore[attr-defined]
    return chosen, attention


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str | None = None
) -> torch.Tensor:
    """One attention call through the registry ([B, S, H, D] in and out)."""
    return get_attention_backend(backend)[1](q, k, v, scale)
