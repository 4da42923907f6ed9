"""Where the weights of a pipeline loaded with a memory budget live (host-resident loading).

`HiFlowPipeline.from_pretrained(..., device=D, memory_budget=B)` reads every weight into host
memory and then places on D only what every plan keeps there: the transformer outside its
blocks (embedders, conditioning, output layers) and the VAE. The transformer blocks stay in host
memory (pinned when D is a CUDA device, so that their copies run asynchronously on a side
stream); each call's plan (`hiflow_fast.memory_plan`) puts the stage's resident blocks on D and
streams the others (`hiflow_fast.block_streaming`), and after the call the blocks are host-only
again. A card smaller than the weights never holds them all, not even while loading.

The text encoders stay in host memory as well; for the encode they visit D when they fit in the
budget beside what is already there, else they encode on the CPU (slow for T5-XXL, but the only
way on a card smaller than its 9.5 GB), and they are back on the host before the base stage.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

import torch

from .block_streaming import transformer_blocks

logger = logging.getLogger(__name__)

# Room for the encoders' activations beside their weights: T5-XXL over 512 tokens holds a few
# hundred MB at most (hidden 4096, MLP 10240, 64 heads of 512x512 scores in fp32: 64 MiB).
TEXT_ENCODE_WORK_BYTES = 512 * 2**20
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass(frozen=True)
class HostPlacement:
    """A pipeline loaded with a budget: its device and the budget given (a call without one uses it)."""

    device: torch.device
    memory_budget: int | float | str
    budget_bytes: int


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def place_host_resident(pipe, device: torch.device, memory_budget, budget_bytes: int, *, pin: bool | None = None) -> HostPlacement:
    """Move to `device` the transformer outside its blocks and the VAE; leave the blocks (and any
    text encoders) in host memory, pinned when `pin` (default: for a CUDA device)."""
    device = torch.device(device)
    pin = device.type == "cuda" if pin is None else pin
    transformer = pipe.transformer
    for name, child in transformer.named_children():
        if name not in BLOCK_LISTS:
            child.to(device)
    for name, p in transformer.named_parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in transformer.named_buffers(recurse=False):
        setattr(transformer, name, b.to(device))
    pipe.vae.to(device)
    if pin:
        for block in transformer_blocks(transformer):
            for p in block.parameters():
                p.data = p.data.pin_memory()
    placement = HostPlacement(device=device, memory_budget=memory_budget, budget_bytes=int(budget_bytes))
    on_device = _bytes(pipe.vae) + _bytes(transformer) - sum(_bytes(b) for b in transformer_blocks(transformer))
    logger.info("loaded for a %.2f GiB budget: %.2f GiB on %s (transformer outside its blocks, VAE); blocks in %shost memory",
                placement.budget_bytes / 2**30, on_device / 2**30, device, "pinned " if pin else "")
    return placement


def _text_encoders(pipe) -> list[torch.nn.Module]:
    flux = getattr(pipe, "flux_pipeline", None)
    if flux is None:
        return []
    return [m for m in (getattr(flux, "text_encoder", None), getattr(flux, "text_encoder_2", None)) if isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def text_encoders_for_encode(pipe, placement: HostPlacement, budget_bytes: int) -> Iterator[torch.device]:
    """Yield the device to encode on: the pipeline's, with the text encoders moved there when
    they fit in `budget_bytes` beside the transformer's non-block modules and the VAE, else the
    CPU. On exit the encoders are in host memory again (before the base stage)."""
    encoders = _text_encoders(pipe)
    host = torch.device("cpu")
    if not encoders:
        yield placement.device
        return
    transformer = pipe.transformer
    resident = _bytes(pipe.vae) + _bytes(transformer) - sum(_bytes(b) for b in transformer_blocks(transformer))
    need = sum(_bytes(m) for m in encoders) + TEXT_ENCODE_WORK_BYTES
    if resident + need > budget_bytes:
        logger.warning("text encoders (%.2f GiB) do not fit the %.2f GiB budget beside the %.2f GiB on %s: encoding on the CPU",
                       (need - TEXT_ENCODE_WORK_BYTES) / 2**30, budget_bytes / 2**30, resident / 2**30, placement.device)
        for m in encoders:
            m.to(host)
        yield host
        return
    try:
        for m in encoders:
            m.to(placement.device)
        yield placement.device
    finally:
        for m in encoders:
            m.to(host)
