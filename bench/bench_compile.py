"""Offline compile matrix: every Triton kernel compiled for sm_80/86/89/90 with no GPU.

    hiflow-fast bench compile --targets 80,86,89,90 --json compile.json [--markdown compile.md]
    hiflow-fast bench compile --reduced --json ci.json          # the CI subset (tests/test_compile_matrix.py)

Each kernel is compiled through its own wrapper, called on meta tensors at Flux shapes under a
fake Triton driver (bench/offline_compile.py), so the arguments, the specialisation and the
autotuner's pruning are the ones a launch would see: flash attention for fp16/bf16, every head
dim class the op accepts (16..256: one per padded tile width, plus non-powers of two, which are
masked), RoPE on load on and off, every autotune config (pruned ones too: `selectable` says
whether the autotuner may pick it on that target), and the log-sum-exp variant ring attention
calls (STORE_LSE; `lse` rows) at Flux's head dim without RoPE; qk_norm_rope at Flux's head dim (and 64);
the guidance kernels at the 4K latent (16 x 512 x 512, fp32). A row per compiled variant:

    kernel, target, dtype, head_dim, rope, lse, config, shared_bytes, shared_limit, launchable,
    registers, spill_bytes, selectable

(`launchable`: the kernel compiled and its shared memory fits the target's per-block limit;
`spill_bytes`: ptxas's spill stores per thread; `stack_bytes`, also recorded, includes the small
local array of libdevice's accurate sin/cos.) Exit status 1 when a selectable config
cannot launch, or when the default Flux path spills (`default_path` rows: bf16, head dim 128,
RoPE done by qk_norm_rope, i.e. attention without RoPE on load; with and without the lse store),
the two checks CI makes.

ptxas takes ~5-15 s per config on a small CPU: the full matrix (4 targets) is ~1 hour on 2
cores, --reduced a few minutes. Triton caches compiled kernels (TRITON_CACHE_DIR, default
~/.triton/cache): a rerun is quick, an honest timing needs an empty cache dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Iterator

import torch

from hiflow_fast.bench.common import Outputs, add_common_arguments, bench_main, comma_list, markdown_table, run_environment
from hiflow_fast.bench.offline_compile import SHARED_LIMIT, CaptureLauncher, Compiled, offline_target
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "compile"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# One head dim per padded tile width the op accepts (16..256), plus non-powers of two (masked
# lanes): every other accepted head dim compiles to one of these tile shapes.
HEAD_DIMS = (16, 32, 64, 96, 128, 192, 256)
# Flux at 4K: 512 text + 65,536 image tokens, 24 heads; RoPE axes (16, 56, 56) at head dim 128.
FLUX_TOKENS = 512 + 65_536
FLUX_HEADS = 24
FLUX_HEAD_DIM = 128
LATENT_4K = (1, 16, 512, 512)
# The CI subset: Flux's head dim and the widest one (the largest tiles), bf16, RoPE on and off.
REDUCED = dict(dtypes=("bf16",), head_dims=(128, 256), guidance=False)


def rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Pairs per RoPE axis for a head dim: Flux's (8, 28, 28) at 128, the same proportions else."""
    pairs = head_dim // 2
    side = (pairs * 7) // 16
    return pairs - 2 * side, side, side


def flash_attention_cases(dtypes, head_dims) -> Iterator[tuple[dict[str, Any], Any]]:
    """(row fields, a function compiling the case through launch_flash_attention)."""
    from hiflow_fast.kernels.flash_attention import launch_flash_attention

    for dtype_name in dtypes:
        for head_dim in head_dims:
            # (RoPE on load, lse store): the lse variant (ring attention's) at Flux's head dim only.
            variants = [(False, False), (True, False)] + ([(False, True)] if head_dim == FLUX_HEAD_DIM else [])
            for rope, lse in variants:
                def run(launcher, head_dim=head_dim, rope=rope, lse=lse, dtype=DTYPES[dtype_name]):
                    q, k, v, out = (torch.empty(1, FLUX_TOKENS, FLUX_HEADS, head_dim, dtype=dtype, device="meta") for _ in range(4))
                    ids = torch.empty(FLUX_TOKENS, 3, dtype=torch.float32, device="meta") if rope else None
                    lse_out = torch.empty(1, FLUX_TOKENS, FLUX_HEADS, dtype=torch.float32, device="meta") if lse else None
                    launch_flash_attention(q, k, v, out, 0.088, ids, rope_pairs(head_dim) if rope else (0, 0, 0),
                                           13.3, lse=lse_out, launcher=launcher)

                fields = dict(dtype=dtype_name, head_dim=head_dim, rope=rope, lse=lse,
                              default_path=dtype_name == "bf16" and head_dim == FLUX_HEAD_DIM and not rope)
                yield fields, run


def qk_norm_rope_cases(dtypes, *, flux_only: bool = False) -> Iterator[tuple[dict[str, Any], Any]]:
    """qk_norm_rope as the Flux blocks call it (norm + RoPE; `flux_only`: head dim 128 only),
    else also norm only and head dim 64."""
    from hiflow_fast.kernels.qk_norm_rope import launch_qk_norm_rope

    for dtype_name in dtypes:
        for head_dim in (FLUX_HEAD_DIM,) if flux_only else (64, FLUX_HEAD_DIM):
            for rope in (True,) if flux_only else (False, True):
                def run(launcher, head_dim=head_dim, rope=rope, dtype=DTYPES[dtype_name]):
                    q, k, q_out, k_out = (torch.empty(1, FLUX_TOKENS, FLUX_HEADS, head_dim, dtype=dtype, device="meta")
                                          for _ in range(4))
                    w = torch.empty(head_dim, dtype=torch.float32, device="meta")
                    ids = torch.empty(FLUX_TOKENS, 3, dtype=torch.float32, device="meta") if rope else None
                    launch_qk_norm_rope(q, k, q_out, k_out, w, w, w, w, ids, rope_pairs(head_dim), 13.0, 1e-8, 1e-6,
                                        512, apply_rope=rope, launcher=launcher)

                yield dict(dtype=dtype_name, head_dim=head_dim, rope=rope, default_path=False), run


def guidance_cases() -> Iterator[tuple[dict[str, Any], Any]]:
    """The guidance ops' bodies (their triton_op functions) at the 4K latent, fp32."""
    from hiflow_fast.ops import guidance_ops

    b, c, h, w = LATENT_4K
    tokens, features = (h // 2) * (w // 2), c * 4

    def meta(*shape):
        return torch.empty(*shape, dtype=torch.float32, device="meta")

    def reference_flow():
        guidance_ops.reference_flow._init_fn(meta(b, tokens, features), meta(b, tokens, features),
                                             meta(b, tokens // 4, features), h // 2, w // 2, 0.5,
                                             meta(b, tokens, features), meta(b, c, h, w))

    def guided_velocity(prev_mode):
        def run():
            packed = meta(b, tokens, features)
            state = packed if prev_mode == guidance_ops.PREV_SEPARATE else None
            guidance_ops.guided_velocity._init_fn(packed, packed, meta(b, c, h, w), meta(b, tokens // 4, features),
                                                  state, state, h // 2, w // 2, h, w, h, w, 0.5, 0.4, 0.3,
                                                  prev_mode, packed, packed, packed)
        return run

    def haar():
        guidance_ops.haar_lowpass_blend._init_fn(meta(b, c, h, w), 0.5)

    def spectral():
        guidance_ops.spectral_lowpass_blend._init_fn(meta(b, c, h, w), 0.25, 4, 0.5)

    runs = [("reference_flow", reference_flow), ("haar_lowpass_blend", haar), ("spectral_lowpass_blend", spectral)]
    runs += [(f"guided_velocity prev_mode={m}", guided_velocity(m)) for m in (0, 1, 2)]
    for label, fn in runs:
        def run(launcher, fn=fn):
            saved = guidance_ops.wrap_triton
            guidance_ops.wrap_triton = launcher
            try:
                fn()
            finally:
                guidance_ops.wrap_triton = saved

        yield dict(dtype="fp32", head_dim=None, rope=None, default_path=False, case=label), run


def compile_rows(targets, dtypes, head_dims, *, guidance: bool, all_configs: bool = True,
                 reduced: bool = False) -> Iterator[dict[str, Any]]:
    """One row per compiled kernel variant, target by target."""
    for target in targets:
        cases = list(flash_attention_cases(dtypes, head_dims)) + list(qk_norm_rope_cases(dtypes, flux_only=reduced))
        if guidance:
            cases += list(guidance_cases())
        for fields, run in cases:
            launcher = CaptureLauncher(all_configs=all_configs)
            start = time.perf_counter()
            with offline_target(target):
                run(launcher)
            seconds = time.perf_counter() - start
            for compiled in launcher.results:
                yield row(compiled, target, fields, seconds / max(1, len(launcher.results)))


def row(compiled: Compiled, target: int, fields: dict[str, Any], seconds: float) -> dict[str, Any]:
    limit = SHARED_LIMIT[target]
    launchable = compiled.error is None and compiled.shared_bytes is not None and compiled.shared_bytes <= limit
    return dict(
        name=BENCH_NAME, kernel=compiled.kernel, target=f"sm_{target}", dtype=fields["dtype"],
        head_dim=fields["head_dim"], rope=fields["rope"], lse=fields.get("lse", False), config=compiled.config,
        shared_bytes=compiled.shared_bytes, shared_limit=limit, launchable=launchable,
        registers=compiled.registers, spill_bytes=compiled.spill_bytes, selectable=compiled.selectable,
        stack_bytes=compiled.stack_bytes,
        num_warps=compiled.num_warps, default_path=fields["default_path"], case=fields.get("case"),
        error=compiled.error, compile_s=seconds,
    )


def failures(rows: list[dict[str, Any]]) -> list[str]:
    """What CI fails on: a selectable config that cannot launch; a spill on the default Flux path."""
    found = []
    for r in rows:
        where = f"{r['kernel']} {r['target']} {r['dtype']} D={r['head_dim']} rope={r['rope']} lse={r.get('lse')} {r['config']}"
        if r["selectable"] and not r["launchable"]:
            found.append(f"selectable but cannot launch: {where} (shared {r['shared_bytes']} > {r['shared_limit']}; {r['error']})")
        if r["default_path"] and r["selectable"] and r["kernel"] == "flash_attention_kernel" and r["spill_bytes"]:
            found.append(f"default Flux path spills {r['spill_bytes']} B/thread: {where}")
    return found


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,86,89,90", help="comma list of compute capabilities (80, 86, 89, 90)")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma list of bf16, fp16 (attention, qk_norm_rope)")
    parser.add_argument("--head-dims", default=",".join(map(str, HEAD_DIMS)), help="comma list of attention head dims (16..256)")
    parser.add_argument("--reduced", action="store_true",
                        help="the CI subset: bf16, head dims 128 and 256, qk_norm_rope as Flux runs it, no guidance "
                             "kernels, selectable configs only")
    parser.add_argument("--no-guidance", action="store_true", help="leave out the guidance kernels")
    parser.add_argument("--selectable-only", action="store_true", help="compile only the configs the autotuner may pick")
    # --device and --cpu-allocator are accepted (bench all passes them) and change nothing: the
    # compile runs on the CPU for the --targets.
    add_common_arguments(parser)
    args = parser.parse_args(argv)
    if args.plot is not None:
        raise HiFlowInputError("--plot", str(args.plot), "nothing: bench compile writes --json and --markdown only")
    targets = comma_list("--targets", args.targets, tuple(str(t) for t in SHARED_LIMIT))
    args.targets = [int(t) for t in targets]
    if not args.targets:
        raise HiFlowInputError("--targets", args.targets, "at least one of 80, 86, 89, 90")
    args.dtypes = comma_list("--dtypes", args.dtypes, tuple(DTYPES))
    try:
        args.head_dims = [int(d) for d in args.head_dims.split(",") if d.strip()]
    except ValueError:
        raise HiFlowInputError("--head-dims", args.head_dims, "a comma list of integers 16..256") from None
    for d in args.head_dims:
        if not 16 <= d <= 256:
            raise HiFlowInputError("--head-dims", d, "16 to 256")
    if args.reduced:
        args.dtypes, args.head_dims = list(REDUCED["dtypes"]), list(REDUCED["head_dims"])
        args.no_guidance, args.selectable_only = True, True
    return args


COLUMNS = [("kernel", "kernel"), ("case", "case"), ("target", "target"), ("dtype", "dtype"), ("D", "head_dim"),
           ("rope", "rope"), ("lse", "lse"), ("config", "config"), ("shared B", "shared_bytes"), ("limit", "shared_limit"),
           ("launchable", "launchable"), ("regs", "registers"), ("spill B", "spill_bytes"),
           ("selectable", "selectable")]


def _use_compiled_triton() -> None:
    """Compiled kernels whatever the caller's environment: triton picks its interpreter when it
    is imported, so TRITON_INTERPRET=1 can still be dropped only before that."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    if "triton" in sys.modules:
        raise HiFlowInputError("TRITON_INTERPRET", "1", "unset: bench compile needs compiled Triton (run it in a fresh process)")
    del os.environ["TRITON_INTERPRET"]


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    outputs = Outputs(args.json, args.markdown, overwrite=args.overwrite)
    _use_compiled_triton()
    environment = run_environment("cpu")
    environment.pop("nvml", None)
    start = time.perf_counter()
    for r in compile_rows(args.targets, args.dtypes, args.head_dims, guidance=not args.no_guidance,
                          all_configs=not args.selectable_only, reduced=args.reduced):
        r.update(environment)
        outputs.add([r])
        flag = "" if r["launchable"] else "  CANNOT LAUNCH"
        print(f"{r['target']} {r['kernel']} {r['case'] or ''} {r['dtype']} D={r['head_dim']} rope={r['rope']} lse={r['lse']} "
              f"{r['config']}: shared {r['shared_bytes']} regs {r['registers']} spill {r['spill_bytes']} "
              f"selectable {r['selectable']}{flag}", flush=True)
    problems = failures(outputs.records)
    markdown = "\n".join([
        "# Offline compile matrix",
        "",
        f"Triton {environment['versions'].get('triton')}, commit {environment.get('commit')}; compiled with no GPU "
        f"in {time.perf_counter() - start:.0f} s. Shared bytes per block against the target's limit, registers "
        "and local (spill) bytes per thread.",
        "",
        markdown_table(outputs.records, COLUMNS),
        "",
        *(["Problems:", "", *(f"- {p}" for p in problems)] if problems else ["No problems."]),
        "",
    ])
    outputs.finish(markdown, title="offline compile matrix")
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
