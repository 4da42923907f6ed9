"""Compiling our Triton kernels for a GPU that is not there (the engine of `bench compile`).

Triton asks its active driver for the target (`get_current_target`), the device and the stream
when a kernel is launched, and compiles (JIT, LLVM, ptxas) before it launches. `FakeDriver`
answers for a chosen compute capability, with `meta` as the torch device, so that the wrappers
of kernels/ and hiflow_fast/ops can be called on meta tensors (data_ptr 0: 16-byte aligned, as
the caching allocator's pointers are) and `CaptureLauncher` stands in for the launch: it compiles
the kernel exactly as the wrapper would launch it (`JITFunction.warmup`, same arguments, same
specialisation) and, for an autotuned kernel, every config of its list, noting which ones the
autotuner's own pruning keeps on that target (`selectable`). Nothing is launched.

Resources of a compiled kernel: shared memory from its metadata; registers, spill stores and
the stack frame (bytes per thread) from ptxas's own report (`ptxas -v`, which Triton runs and
prints under TRITON_DUMP_PTXAS_LOG: captured at compile time and kept beside Triton's cache, or,
for a kernel Triton had cached before, by running the bundled ptxas -v on its PTX once more).
The stack frame is not all spills: libdevice's accurate sin/cos keep a small local array for
their large-argument path. This module must be imported
with TRITON_INTERPRET unset (the kernels must be compiled JITFunctions, not interpreted ones).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

# Shared memory one block may use (the opt-in maximum, bytes), per compute capability:
# A100 (sm_80) 163 KiB + 1 KiB reserved, RTX 30xx/40xx (sm_86/sm_89) 99 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
TARGETS = tuple(SHARED_LIMIT)


def triton_bin(name: str) -> str:
    """A CUDA tool bundled with triton (ptxas, cuobjdump)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def fake_driver(cc: int):
    """A Triton driver for compute capability `cc` (e.g. 86) that compiles but never runs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class FakeDriver(DriverBase):
        # The device index is the capability itself: a JITFunction keeps its compiled kernels
        # (and the target they were built for) per device, so targets never share a cache entry.
        def __init__(self) -> None:
            self.cc = cc

        @classmethod
        def is_active(cls) -> bool:
            return False

        def map_python_to_cpp_type(self, ty: str) -> str:
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", self.cc, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_current_device(self) -> int:
            return self.cc

        def get_current_stream(self, device=None) -> int:
            return 0

        def get_benchmarker(self):
            raise RuntimeError("an offline compile cannot time kernels")

    assert triton.__version__  # the import above is the point: triton must be importable
    return FakeDriver()


@contextlib.contextmanager
def offline_target(cc: int) -> Iterator[None]:
    """Make Triton compile for sm_`cc` within the block."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("offline compiles need compiled Triton: unset TRITON_INTERPRET before importing triton")
    from triton.runtime.driver import driver

    driver.set_active(fake_driver(cc))
    try:
        yield
    finally:
        # No real driver on a machine without a GPU: leave none active rather than create one.
        driver._active = None


@dataclass
class Compiled:
    """One compiled kernel variant and what it needs to launch."""

    kernel: str
    config: str
    selectable: bool
    shared_bytes: int | None = None
    num_warps: int | None = None
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    error: str | None = None


def parse_ptxas_log(text: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, stack frame bytes) per thread from a `ptxas -v` log."""
    # ptxas prints "N bytes stack frame, S bytes spill stores, ..." before "Used R registers".
    regs = re.search(r"Used (\d+) registers", text)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", text)
    if regs is None or frame is None:
        raise RuntimeError(f"no resource usage in ptxas's report: {text!r}")
    return int(regs.group(1)), int(frame.group(2)), int(frame.group(1))


def _log_path(compiled) -> str:
    from triton.knobs import cache

    return os.path.join(cache.dir, "hiflow_ptxas_logs", f"{compiled.hash}.txt")


def ptxas_report(compiled, captured: str) -> str:
    """ptxas's -v report of a compiled kernel: the one captured while compiling it, else the one
    kept from an earlier compile, else ptxas -v run again on its PTX (a kernel that came from
    Triton's cache)."""
    path = _log_path(compiled)
    if "registers" in captured:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(path), delete=False) as f:
            f.write(captured)
        os.replace(f.name, path)
        return captured
    if os.path.exists(path):
        with open(path) as f:
            return f.read()
    target = compiled.metadata.target
    arch = f"sm_{target.arch}a" if target.arch >= 90 else f"sm_{target.arch}"
    with tempfile.TemporaryDirectory(prefix="hiflow-ptx-") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([triton_bin("ptxas"), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def config_label(kwargs: dict[str, Any], num_warps: int, num_stages: int) -> str:
    """'128x64 w8 s3' for BLOCK_M/BLOCK_N configs, else 'BLOCK=1024 w4 s3'."""
    if "BLOCK_M" in kwargs and "BLOCK_N" in kwargs:
        head = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
    else:
        head = " ".join(f"{k}={v}" for k, v in sorted(kwargs.items())) or "default"
    return f"{head} w{num_warps} s{num_stages}"


def _compile(kernel_name: str, label: str, selectable: bool, compile_fn: Callable[[], Any]) -> Compiled:
    from triton import knobs
    from triton.compiler.errors import CompilationError

    log = io.StringIO()
    try:
        # Triton prints ptxas's report (to stdout) only when asked.
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = compile_fn()
    except (CompilationError, RuntimeError, ValueError) as exc:  # a config that does not even compile
        return Compiled(kernel_name, label, selectable, error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    registers, spills, stack = parse_ptxas_log(ptxas_report(compiled, log.getvalue()))
    return Compiled(kernel_name, label, selectable, compiled.metadata.shared, compiled.metadata.num_warps, registers,
                    spills, stack)


@dataclass
class CaptureLauncher:
    """Stands in for `launcher` / `wrap_triton` in a wrapper: `launcher(kernel)[grid](*args, **kw)`
    compiles instead of launching. An autotuned kernel: every config of its list (or only the
    ones its pruning keeps, with `all_configs=False`)."""

    all_configs: bool = True
    results: list[Compiled] = field(default_factory=list)

    def __call__(self, kernel):
        return _Capture(self, kernel)


@dataclass
class _Capture:
    launcher: CaptureLauncher
    kernel: Any

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._compile(grid, args, kwargs)

    def _compile(self, grid, args, kwargs) -> None:
        from triton.runtime.autotuner import Autotuner

        kernel = self.kernel
        if isinstance(kernel, Autotuner):
            kernel.nargs = dict(zip(kernel.arg_names, args))
            try:
                kept = {str(c) for c in kernel.prune_configs(kwargs)}
            finally:
                kernel.nargs = None
            jit = kernel.fn
            configs = kernel.configs if self.launcher.all_configs else [c for c in kernel.configs if str(c) in kept]
            for config in configs:
                label = config_label(config.kwargs, config.num_warps, config.num_stages)
                self.launcher.results.append(
                    _compile(jit.fn.__name__, label, str(config) in kept,
                             lambda: jit.warmup(*args, grid=grid, **kwargs, **config.all_kwargs()))
                )
            return
        tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
        label = config_label(tiles, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))
        self.launcher.results.append(
            _compile(kernel.fn.__name__, label, True, lambda: kernel.warmup(*args, grid=grid, **kwargs))
        )
