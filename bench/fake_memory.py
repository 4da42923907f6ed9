"""Peak activation memory of a forward pass, counted on fake tensors (no compute, any machine).

A FluxTransformer2DModel at 4096² (66,048 tokens, 12B parameters) cannot run on the 2-core CPU
machines this project is built on, but how much memory its activations need does not depend
on the values: under `FakeTensorMode` every op produces a tensor with the real shape, dtype and
strides and no data, in milliseconds. `count_peak_bytes` runs a function that way and counts
the bytes of the tensors alive at every moment:

* an op's result is new memory unless its schema says it aliases an input (views, in-place and
  out= ops add nothing); custom ops count what their fake implementation allocates, which for
  our Triton kernels is exactly what the kernel allocates (its outputs);
* memory is released when the last reference to its storage dies (a reference cycle holds it
  until the garbage collector runs, as in a real run);
* what existed before the call (weights, inputs, caches) is not counted.

What it does not see: allocator rounding and fragmentation, and workspaces a library allocates
outside PyTorch's tensors (cuBLAS, cuDNN, the flash-attention scratch). It is therefore a lower
bound of what `torch.cuda.max_memory_allocated` reports for the same forward, by the size of
those; `bench_transformer --full` measures the real figure on a GPU.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass
class CountedPeak:
    peak_bytes: int  # most bytes alive at once during the call (the result included)
    retained_bytes: int  # bytes still alive once the result is dropped (caches the call created)
    ops: int  # ops dispatched


class _LiveStorageCounter(TorchDispatchMode):
    """Counts the storages that ops create and that are still referenced."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[StorageWeakRef, int] = {}
        self.current = 0
        self.peak = 0
        self.ops = 0

    def release_dead(self) -> None:
        for ref in [ref for ref in self.live if ref.expired()]:
            self.current -= self.live.pop(ref)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        self.ops += 1
        # Release first: an op's temporaries of the previous op are gone by the time this
        # op's result exists (the count follows Python's reference counting).
        self.release_dead()
        returns = func._schema.returns
        values = result if isinstance(result, (tuple, list)) else (result,)
        for index, value in enumerate(values):
            if not isinstance(value, torch.Tensor):
                continue
            # One schema return may be a whole Tensor[] (split, chunk, unbind): its annotation
            # covers every element.
            schema_return = returns[index] if len(returns) == len(values) else returns[0]
            if schema_return.alias_info is not None:
                continue  # a view, or the input an in-place / out= op wrote
            storage = value.untyped_storage()
            ref = StorageWeakRef(storage)
            if ref not in self.live:
                self.live[ref] = storage.nbytes()
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return result


def count_peak_bytes(fn: Callable[[], Any]) -> CountedPeak:
    """Run fn() (its tensors fake: call inside a `FakeTensorMode` whose tensors fn uses) and
    count the peak bytes of the tensors it creates; see the module docstring for what counts."""
    counter = _LiveStorageCounter()
    with counter:
        result = fn()
        del result
        gc.collect()
        counter.release_dead()
    return CountedPeak(peak_bytes=counter.peak, retained_bytes=counter.current, ops=counter.ops)
