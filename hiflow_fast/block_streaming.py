"""Transformer blocks streamed from host memory, a few blocks ahead of their use.

`BlockStreamer` keeps the blocks a memory plan marks resident on the device and holds the
others in (pinned) host memory: when block i starts, the copies of the next `prefetch` streamed
blocks are already on their way on a side CUDA stream, ordered by events, so a copy overlaps
the compute of the blocks before it; when a streamed block ends, its device copy is released
(the caching allocator reuses its memory for the next copy). Copies are exact, so the
arithmetic is the resident run's, bit for bit.

Why not diffusers' group offloading (`enable_group_offload(offload_type="block_level",
use_stream=True)`), which does the copies on a side stream too:

* it offloads every block of a ModuleList; a plan keeps a prefix of the blocks resident and
  streams the rest, and changes that split from stage to stage (the 1K base stage keeps many
  more blocks than the 4K stage);
* it works through diffusers hooks on each block, and the fast path
  (hiflow_fast.fast_transformer) keeps the stock forward of any block carrying diffusers hooks,
  so group offloading would switch the lean 4K blocks off, which is what makes 4K fit at all;
* it must be removed from the model again after each call (the pipeline's rule), which it has
  no public way to do.

Here the hooks are plain torch forward hooks, registered on the instance and removed, with every
parameter restored to its original tensor, on `close()` (or leaving the `with`).

On a CPU there is no side stream: the copies are synchronous, host to host, from a separate
host copy into the module's parameter storage, which is what the tests exercise.

Blocks whose own tensors live in host memory (`host_origin=True`: a pipeline loaded with a
budget, hiflow_fast.host_placement, or the fp8 weights of a lossy plan) are never copied to the
host: their tensors are the host copies, resident blocks get a device copy for the stage, and
`close()` gives every parameter its own host tensor back. The device copy is a real copy on a
CPU too, so the tests see the same path move bytes.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable

import torch

logger = logging.getLogger(__name__)


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """The blocks of a Flux transformer in execution order: double blocks, then single blocks."""
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


class _Loaded:
    """The device copies of one block's parameters and the event that marks them complete."""

    def __init__(self, tensors: list[torch.Tensor], event):
        self.tensors = tensors
        self.event = event


class BlockStreamer:
    """Stream the non-resident blocks of `transformer` onto `device` around their forward.

    Use as a context manager; `set_resident(indices)` (at every stage) chooses the blocks that
    stay on the device, all others are streamed. `prefetch`: blocks copied ahead of use."""

    def __init__(self, transformer, device: torch.device | str | None = None, prefetch: int = 2, host_origin: bool = False):
        self.blocks = transformer_blocks(transformer)
        first = next(transformer.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.prefetch = int(prefetch)
        self._params = [list(block.parameters()) for block in self.blocks]
        self._original = [[p.data for p in params] for params in self._params]
        self._host: dict[int, list[torch.Tensor]] = {}
        self._loaded: dict[int, _Loaded] = {}
        self._streamed: list[int] = []
        self._hooks: list = []
        self._cuda = self.device.type == "cuda"
        self._side = torch.cuda.Stream(self.device) if self._cuda else None
        self.copies = 0  # block copies made (how tests know the path ran)
        self.bytes_copied = 0
        self.host_origin = bool(host_origin)
        if self.host_origin:
            # Every block starts off the device; its own tensors are the host copies.
            for i, params in enumerate(self._params):
                self._host[i] = list(self._original[i])
                for p in params:
                    p.data = _placeholder(p.data, self.device)
        for index, block in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(self._make_pre_hook(index)))
            self._hooks.append(block.register_forward_hook(self._make_post_hook(index)))

    # -- residency ---------------------------------------------------------------------------
    def set_resident(self, resident: Iterable[int]) -> None:
        """Blocks in `resident` on the device for good, the others streamed. Blocks leaving the
        device go first, so that the peak never holds both sets."""
        resident = set(resident)
        self._drop_prefetched()
        streamed = [i for i in range(len(self.blocks)) if i not in resident]
        for i in streamed:
            if i not in self._host:
                self._offload(i)
        for i in sorted(resident):
            if i in self._host:
                self._onload_for_good(i)
        self._streamed = streamed

    def resident_bytes(self) -> int:
        """Bytes of block parameters held on the device for good (streamed copies excluded)."""
        return sum(
            t.numel() * t.element_size()
            for i, params in enumerate(self._params)
            if i not in self._host
            for t in (p.data for p in params)
        )

    @property
    def streamed(self) -> list[int]:
        return list(self._streamed)

    def _offload(self, i: int) -> None:
        if self.host_origin:
            # The host tensors are the block's own: dropping the device copy is all there is.
            self._host[i] = list(self._original[i])
            for p in self._params[i]:
                p.data = _placeholder(p.data, self.device)
            return
        host = []
        for p in self._params[i]:
            data = p.data
            # A separate host copy (pinned when a GPU will read it): on a CPU this is what the
            # streaming path copies from, so the same code moves real bytes there too.
            copy = torch.empty(data.shape, dtype=data.dtype, device="cpu", pin_memory=self._cuda)
            copy.copy_(data)
            host.append(copy)
            p.data = _placeholder(data, self.device)
        self._host[i] = host
        if self._cuda:
            # The original device tensors are released here (kept only as host copies).
            self._original[i] = [None] * len(host)

    def _onload_for_good(self, i: int) -> None:
        host = self._host.pop(i)
        if self.host_origin:
            for p, h in zip(self._params[i], host):
                p.data = torch.empty(h.shape, dtype=h.dtype, device=self.device).copy_(h)
            self.copies += 1
            self.bytes_copied += sum(h.numel() * h.element_size() for h in host)
            return
        for p, h, original in zip(self._params[i], host, self._original[i]):
            if original is not None and original.device == self.device:
                p.data = original  # the user's own tensor, unchanged (CPU: never moved)
            else:
                p.data = h.to(self.device)

    # -- streaming ---------------------------------------------------------------------------
    def _load(self, i: int) -> None:
        if i in self._loaded:
            return
        host = self._host[i]
        if self._cuda:
            with torch.cuda.stream(self._side):
                tensors = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in host]
                for t, h in zip(tensors, host):
                    t.copy_(h, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._side)
        else:
            tensors = [torch.empty(h.shape, dtype=h.dtype, device=self.device) for h in host]
            for t, h in zip(tensors, host):
                t.copy_(h)
            event = None
        self._loaded[i] = _Loaded(tensors, event)
        self.copies += 1
        self.bytes_copied += sum(t.numel() * t.element_size() for t in tensors)

    def _use(self, i: int) -> None:
        loaded = self._loaded[i]
        if self._cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(loaded.event)
            for t in loaded.tensors:
                # Allocated on the side stream, read on this one: the allocator must not hand
                # the memory to the next copy before this stream is done with it.
                t.record_stream(current)
        for p, t in zip(self._params[i], loaded.tensors):
            p.data = t

    def _release(self, i: int) -> None:
        loaded = self._loaded.pop(i, None)
        if loaded is None:
            return
        for p, t in zip(self._params[i], loaded.tensors):
            p.data = _placeholder(t, self.device)

    def _drop_prefetched(self) -> None:
        for i in list(self._loaded):
            self._release(i)

    def _ahead(self, i: int) -> list[int]:
        """The next `prefetch` streamed blocks after block i, wrapping into the next step."""
        if not self._streamed:
            return []
        later = [j for j in self._streamed if j > i] + [j for j in self._streamed if j <= i]
        return [j for j in later if j != i][: self.prefetch]

    def _make_pre_hook(self, i: int):
        def pre_hook(module, args):
            if i in self._host:
                self._load(i)
                self._use(i)
            for j in self._ahead(i):
                self._load(j)
            return None

        return pre_hook

    def _make_post_hook(self, i: int):
        def post_hook(module, args, output):
            if i in self._host:
                self._release(i)
            return None

        return post_hook

    # -- undo --------------------------------------------------------------------------------
    def close(self) -> None:
        """Remove the hooks and put every parameter back as it was (on its original device)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._drop_prefetched()
        if self.host_origin:
            for params, originals in zip(self._params, self._original):
                for p, original in zip(params, originals):
                    p.data = original
            self._host.clear()
            self._streamed = []
            return
        for i in list(self._host):
            host = self._host.pop(i)
            for p, h, original in zip(self._params[i], host, self._original[i]):
                p.data = original if original is not None else h.to(self.device)
        self._streamed = []

    def __enter__(self) -> "BlockStreamer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def _placeholder(like: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An empty tensor standing in for a parameter that is off the device (same dtype): a
    forward that reached it without the streamer would fail on the shape, not compute wrongly."""
    return torch.empty(0, dtype=like.dtype, device=device)


# ---- a plan applied to one pipeline call ------------------------------------------------------


class MemorySession:
    """One pipeline call under a memory plan (`hiflow_fast.memory_plan`), undone on exit.

    Built before any work (the budget is parsed and the plan checked there). `text_encoding()`
    wraps the prompt encode (a pipeline loaded with a budget brings its text encoders onto the
    device for it when they fit, hiflow_fast.host_placement). Entered once the prompt is
    encoded: text encoders still on the device leave it; a lossy plan casts the blocks to fp8
    (hiflow_fast.lossy_weights); `stage(k)` applies stage k's residency before the stage's entry
    VAE work, `stage(None)` takes every block off the device for the final decode. On exit
    everything is as it was: encoders back where they were, hooks removed, every parameter its
    own tensor."""

    def __init__(self, pipe, plan=None):
        self.pipe = pipe
        self.plan = plan
        self.streamer: BlockStreamer | None = None
        self.lossy_weights = None
        self.placement = getattr(pipe, "placement", None)  # set by from_pretrained(memory_budget=...)
        self._moved: list[tuple[torch.nn.Module, torch.device]] = []

    @property
    def label(self) -> str | None:
        """The plan's name ("exact-bfloat16", "lossy-fp8"), None without a plan."""
        return None if self.plan is None else self.plan.name

    @contextlib.contextmanager
    def text_encoding(self):
        """Yield the device the prompt is encoded on (the pipeline's unless a budget-loaded
        pipeline's encoders do not fit the budget: then the CPU)."""
        if self.plan is None or self.placement is None:
            yield self.pipe.device
            return
        from .host_placement import text_encoders_for_encode

        with text_encoders_for_encode(self.pipe, self.placement, self.plan.budget_bytes) as device:
            yield device

    def __enter__(self) -> "MemorySession":
        if self.plan is None:
            return self
        try:
            self._enter()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _enter(self) -> None:
        device = self.pipe.device
        flux = self.pipe.flux_pipeline
        if self.plan.offload_text_encoders and flux is not None:
            for name in ("text_encoder", "text_encoder_2"):
                module = getattr(flux, name, None)
                if not isinstance(module, torch.nn.Module):
                    continue
                first = next(module.parameters(), None)
                if first is not None and first.device == device:
                    # On a CPU this is a no-op move; on a device it frees the encoders' memory.
                    self._moved.append((module, first.device))
                    module.to("cpu")
        host_origin = self.placement is not None
        if not self.plan.exact:
            from .lossy_weights import Fp8BlockWeights

            self.lossy_weights = Fp8BlockWeights(self.pipe.transformer, self.pipe.dtype, pin=device.type == "cuda").apply()
            host_origin = True  # the fp8 weights live in host memory
        if self.plan.streams or host_origin:
            self.streamer = BlockStreamer(self.pipe.transformer, device, prefetch=max(1, self.plan.stages[0].prefetch or 1),
                                          host_origin=host_origin)

    def stage(self, k: int | None) -> None:
        """Apply stage k's residency (None: the final decode, no block on the device)."""
        if self.streamer is None:
            return
        if k is None:
            self.streamer.set_resident(())
            return
        stage = self.plan.stages[k]
        self.streamer.prefetch = max(1, stage.prefetch or 1)
        self.streamer.set_resident(stage.resident_blocks)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if self.streamer is not None:
                self.streamer.close()
        finally:
            try:
                if self.lossy_weights is not None:
                    self.lossy_weights.restore()
            finally:
                for module, device in self._moved:
                    module.to(device)
                self.streamer = None
                self.lossy_weights = None
                self._moved = []
        return False
