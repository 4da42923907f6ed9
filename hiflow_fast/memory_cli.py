"""The command line of memory budgets: `hiflow-fast plan` and `generate --memory-budget`.

    hiflow-fast plan --memory-budget 12GiB --size 4096x4096 [--model DIR] [--target-sizes ...]

prints the plan stage by stage without loading any weights (FLUX.1-dev shapes unless --model
names a folder, whose transformer/config.json alone is read).
"""

from __future__ import annotations

import json

from .errors import HiFlowInputError
from .memory_plan import (
    LOSSY_CHOICES,
    DEFAULT_HOST_BANDWIDTH,
    DEFAULT_MATMUL_RATE,
    FLUX_DEV,
    TransformerShape,
    format_plan,
    plan_memory,
    stage_specs,
)

BUDGET_HELP = "device memory to stay within: 12GiB, 12GB, 512MiB, 12 (GiB) or auto (free CUDA memory); blocks that do not fit are streamed from host memory, same image"


def add_memory_arguments(sub) -> None:
    """Register `plan` and add --memory-budget to `generate` (called once from cli.main)."""
    generate = sub.choices.get("generate")
    if generate is not None:
        generate.add_argument("--memory-budget", help=BUDGET_HELP + "; the weights are loaded into host memory and only what the plan keeps resident goes to --device")
        generate.add_argument("--lossy", choices=LOSSY_CHOICES,
                              help="LOSSY, opt-in: fp8 = the transformer blocks' weights stored in float8 for the run "
                              "(diffusers' layerwise casting; a different image, named in the PNG's metadata); needs --memory-budget")
    from .cli import HelpFormatter  # (cli imports this module at its top: imported here, once both exist)

    p = sub.add_parser("plan", help="print the memory plan for a budget (no weights loaded)", formatter_class=HelpFormatter,
                       description="Print the per-stage memory plan for a budget, without loading weights.")
    p.add_argument("--memory-budget", required=True, help=BUDGET_HELP)
    p.add_argument("--size", default=None, help="the last stage's size HEIGHTxWIDTH (default 4096x4096); "
                   "without --target-sizes the official cascade 1024 -> 2048 -> 4096 is scaled to it")
    p.add_argument("--base-size", default="1024x1024", help="base stage size (default 1024x1024)")
    p.add_argument("--steps", type=int, default=30, help="base-stage steps (default 30)")
    p.add_argument("--target-sizes", help="high-res stage sizes, e.g. 2048x2048,4096x4096 (overrides --size)")
    p.add_argument("--highres-steps", help="steps per high-res stage (default 16,10 / 10 per stage)")
    p.add_argument("--model", help="diffusers-format Flux folder: only transformer/config.json is read")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--lossy", choices=("fp8",), help="LOSSY: block weights stored in float8 (a different image)")
    p.add_argument("--prefetch", type=int, default=2, help="blocks copied ahead of use (1-4, default 2)")
    p.add_argument("--host-bandwidth", type=float, default=DEFAULT_HOST_BANDWIDTH / 1e9, help="GB/s of the host link (default 25)")
    p.add_argument("--matmul-tflops", type=float, default=DEFAULT_MATMUL_RATE / 1e12, help="TFLOP/s of bf16 matmuls (default 70)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=run_plan)


def _size(flag: str, text: str) -> tuple[int, int]:
    from .cli import _parse_size  # generate's size syntax (cli imports this module at its top)

    h, w = _parse_size(flag, str(text))
    if h <= 0 or w <= 0:
        raise HiFlowInputError(flag, text, "HEIGHTxWIDTH in pixels, each side > 0, e.g. 4096x4096")
    if h % 16 or w % 16:
        raise HiFlowInputError(flag, text, "sizes that are multiples of 16 pixels")
    return h, w


def _stages(args):
    base = _size("--base-size", args.base_size)
    if args.target_sizes:
        targets = [_size("--target-sizes", t) for t in args.target_sizes.split(",") if t.strip()]
    else:
        final = _size("--size", args.size or "4096x4096")
        targets = []
        h, w = final
        while h > base[0] or w > base[1]:  # halve back to the base size: the official doubling cascade
            targets.insert(0, (h, w))
            h, w = h // 2, w // 2
        if not targets:
            targets = [final]
    if args.highres_steps:
        from .cli import _parse_list  # generate's list syntax

        steps = _parse_list("--highres-steps", args.highres_steps, int)
    else:
        steps = [16, 10] if len(targets) == 2 else [10] * len(targets)
    if len(steps) != len(targets) or any(s < 1 for s in steps):
        raise HiFlowInputError("--highres-steps", args.highres_steps, f"{len(targets)} integers >= 1, one per high-res stage")
    if args.steps < 1:
        raise HiFlowInputError("--steps", args.steps, "an integer >= 1")
    return stage_specs(base, args.steps, targets, steps)


def run_plan(args, typed=None) -> int:
    shape = TransformerShape.from_model_dir(args.model) if args.model else FLUX_DEV
    for flag, value in (("--host-bandwidth", args.host_bandwidth), ("--matmul-tflops", args.matmul_tflops)):
        if not value > 0:
            raise HiFlowInputError(flag, value, "a positive number")
    plan = plan_memory(
        args.memory_budget, _stages(args), shape=shape, dtype=args.dtype, lossy=args.lossy, prefetch=args.prefetch,
        host_bandwidth=args.host_bandwidth * 1e9, matmul_rate=args.matmul_tflops * 1e12, field="--memory-budget",
    )
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        print(format_plan(plan))
    return 0
