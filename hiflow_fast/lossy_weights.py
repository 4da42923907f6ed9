"""LOSSY fp8 block weights for one pipeline call, undone afterwards.

A lossy memory plan (`memory_budget=..., lossy="fp8"`; `hiflow_fast.memory_plan`) stores the
transformer blocks' weights in float8_e4m3fn and upcasts each layer to the compute dtype for
its forward: diffusers' layerwise casting (`apply_layerwise_casting`), with the transformer's own
skip patterns (`_skip_layerwise_casting_patterns`: modules named "*norm*", so the adaLN linears
and RMSNorm scales keep their precision, as `enable_layerwise_casting` does) and only inside the
blocks (the planner counts the rest of the transformer at full precision). Why layerwise casting
rather than torchao's float8 weight-only path: no extra dependency, it runs on a CPU (where the
tests and the error measurement run), it is per instance and its casts are plain copies.

diffusers' hooks cannot be removed (`LayerwiseCastingHook.deinitalize_hook` raises: the cast
down is lossy), so this module undoes them itself: before casting, every block parameter's own
tensor is kept in host memory (the tensor itself when it already lives there, else a host copy,
and the device tensor is released: the plan counts the blocks at fp8 bytes only); on exit the
hooks' instance `forward` and hook registry are deleted and every parameter gets its own tensor
back (a device one copied back from the host copy, bit for bit). The fp8 weights live in host
memory (pinned for a CUDA device), so `hiflow_fast.block_streaming` puts the plan's resident
blocks on the device and streams the rest, as for a pipeline loaded with a budget.
"""

from __future__ import annotations

import logging

import torch

from .block_streaming import transformer_blocks
from .errors import HiFlowInputError

logger = logging.getLogger(__name__)

FP8_STORAGE = torch.float8_e4m3fn
# Only the blocks are cast: a module whose name (from the transformer) is not inside
# transformer_blocks / single_transformer_blocks is skipped, as are the model's own patterns.
_OUTSIDE_BLOCKS = r"^(?!$|(single_)?transformer_blocks(\.|$))"  # the root ("") is not skipped
# diffusers' Flux declares ["pos_embed", "norm"]; used when a transformer declares none.
_FALLBACK_SKIP_PATTERNS = ("pos_embed", "norm")
_HOOK = "layerwise_casting"  # diffusers.hooks.layerwise_casting._LAYERWISE_CASTING_HOOK


def _hooked(module: torch.nn.Module) -> bool:
    return bool(getattr(getattr(module, "_diffusers_hook", None), "hooks", None))


def check_blocks_unhooked(transformer, field: str = "lossy") -> None:
    """Refuse, before any work, a transformer whose blocks already carry diffusers hooks (its own
    layerwise casting or group offloading): the casts would stack, and this call could not undo
    its own hooks without touching the user's."""
    for block in transformer_blocks(transformer):
        for name, module in block.named_modules():
            if _hooked(module):
                raise HiFlowInputError(field, "fp8", "None for a transformer whose blocks already carry diffusers hooks "
                                       "(enable_layerwise_casting or group offloading): cast them once, yourself, or use a fresh one")


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin else tensor


class Fp8BlockWeights:
    """The blocks of `transformer` stored in fp8, computed in `compute_dtype`, for the duration of
    a `with` (or between `apply()` and `restore()`). `pin`: pin the fp8 host tensors (a CUDA
    device will copy from them)."""

    def __init__(self, transformer, compute_dtype: torch.dtype, *, pin: bool = False):
        self.transformer = transformer
        self.compute_dtype = compute_dtype
        self.pin = pin
        # (parameter, its own tensor if it stays referenced (host), host copy, device it came from)
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor | None, torch.Tensor, torch.device]] = []
        self._hooked: list[torch.nn.Module] = []
        self._had_registry: set[int] = set()
        self.applied = False

    def apply(self) -> "Fp8BlockWeights":
        check_blocks_unhooked(self.transformer)
        from diffusers.hooks import apply_layerwise_casting

        try:
            for block in transformer_blocks(self.transformer):
                for p in block.parameters():
                    data = p.data
                    if data.device.type == "cpu":
                        self._saved.append((p, data, data, data.device))
                    else:
                        # Kept as a host copy only: the device tensor is released (the plan counts
                        # fp8 bytes, not both), and copied back bit for bit on restore.
                        host = data.to("cpu")
                        self._saved.append((p, None, host, data.device))
                        p.data = host
            patterns = tuple(getattr(self.transformer, "_skip_layerwise_casting_patterns", None) or _FALLBACK_SKIP_PATTERNS)
            self._had_registry = {id(m) for m in self.transformer.modules() if hasattr(m, "_diffusers_hook")}
            apply_layerwise_casting(self.transformer, storage_dtype=FP8_STORAGE, compute_dtype=self.compute_dtype,
                                    skip_modules_pattern=(_OUTSIDE_BLOCKS, *patterns))
            self._hooked = [m for m in self._hooked_block_modules() if m._diffusers_hook.get_hook(_HOOK) is not None]
            if self.pin:
                for module in self._hooked:
                    for p in module.parameters(recurse=False):
                        p.data = _pinned(p.data, True)
        except BaseException:
            self.restore()
            raise
        self.applied = True
        logger.warning("LOSSY memory plan: transformer block weights stored in %s (%d layers), computed in %s; "
                       "the image differs from the exact run", FP8_STORAGE, len(self._hooked), self.compute_dtype)
        return self

    def _hooked_block_modules(self) -> list[torch.nn.Module]:
        """Every module in the blocks that carries a diffusers hook. All of them are this
        object's (check_blocks_unhooked ran before apply): the layerwise casts, and the PEFT
        autocast hooks diffusers adds beside them on LoRA layers."""
        return [m for block in transformer_blocks(self.transformer) for m in block.modules() if _hooked(m)]

    def restore(self) -> None:
        """Remove the hooks this object added and give every block parameter its own tensor back.
        The hooked modules are found anew, so that an apply that failed halfway (some layers
        hooked, `_hooked` not yet set) leaves none behind."""
        for module in self._hooked_block_modules():
            # diffusers' registry replaced the instance's forward; the class's is the original.
            if "forward" in vars(module):
                del module.forward
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None:
                continue
            if id(module) in self._had_registry:  # the user's (empty) registry: emptied again
                registry.hooks.clear()
                registry._hook_order.clear()
                registry._fn_refs.clear()
            else:
                del module._diffusers_hook
        self._hooked = []
        for p, own, host, device in self._saved:
            p.data = own if own is not None else host.to(device)
        self._saved = []
        self.applied = False

    def __enter__(self) -> "Fp8BlockWeights":
        return self.apply()

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


def lossy_label(lossy: str | None) -> str | None:
    """The name a run's outputs carry: None for an exact run, else "LOSSY-fp8"."""
    return None if lossy is None else f"LOSSY-{lossy}"

