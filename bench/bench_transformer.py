"""Benchmark of the Flux transformer at 1K/2K/4K token counts: stock diffusers vs HiFlow's
reference path vs the fast path, plus the attention backends.

    python -m hiflow_fast.bench.bench_transformer --device cuda --json out.json
    python -m hiflow_fast.bench.bench_transformer --device cpu --quick
    hiflow-fast bench transformer --device cuda --sizes 4k --full

Model: one double-stream and one single-stream block at FLUX.1-dev width (hidden 3072, 24 heads
x 128, axes 16/56/56, 512 text tokens) with random weights, in --dtype (bf16 by default). Token
counts of the targets: 1k = 4096, 2k = 16384, 4k = 65536 image tokens (+ 512 text). --quick
shrinks everything (4 heads x 32, 64 text tokens, 256/1024 image tokens) for a CPU smoke run.

Paths, each timed block by block (the block inputs are fresh copies per call, since the fast
blocks update them in place):

* stock: diffusers as shipped (float64 RoPE tables, q/k upcast to fp32 for the rotation, SDPA);
* hiflow-ref: hiflow_fast.transformer.patched_transformer (HiFlowAttnProcessor, proportional
  scale, NTK RoPE tables) -- the official HiFlow processor's work;
* fast-tables: the fast blocks (chunked MLPs, in-place residuals) with RoPE tables, i.e. without
  the fused q/k norm + RoPE: fast-tables vs fast isolates what the fused kernel saves;
* fast: hiflow_fast.fast_transformer (fused hiflow_fast::qk_norm_rope, --attention backend).

Per path and size: median/min/max seconds of the double and the single block, their TFLOP/s as
a fraction of the bf16 (CPU: fp32) matmul rate measured in the same run, their peak extra
memory, and the whole-step estimate 19 x double + 38 x single (+ the RoPE embedding) against
the FLOP floor (FLOPs / matmul rate). FLOPs per block: 24 d^2 L (projections and MLP) +
4 d L^2 (attention), L = text + image tokens, d = 3072. Every record's `floor_s` is its FLOPs at
the measured matmul rate and `fraction_of_floor` = floor_s / median (for a block: its TFLOP/s as
a fraction of the matmul rate).

Attention: every registered backend that can run here (SDPA flash / cuDNN / efficient, ours,
diffusers' flash-attn / FA3 / sage if installed) on [1, L, 24, 128] q, k, v with the
proportional scale; TFLOP/s and the ratio of ours to the fastest SDPA kernel. sdpa-math is
skipped beyond 8k tokens (it materialises L^2 scores).

--full (GPU): the whole 19 + 38 block transformer with random weights, peak activation memory
(peak allocated minus the weights) of one forward for stock and fast.

--count-memory (any machine, seconds): the same whole-transformer forward at FLUX.1-dev width
run on fake tensors (bench/fake_memory.py), its peak activation bytes counted for every path:
no timing, no GPU, exact tensor bytes (a lower bound of a GPU's figure by the library
workspaces). The fast path is counted with its GPU kernels (the fused q/k norm + RoPE custom
op), so fast-tables vs fast is what the fused RoPE saves. --compile: also the fast
path through torch.compile + CUDA graphs (warm-up seconds per captured shape reported).

Timing, memory, records and outputs come from bench/common.py (the shared harness).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from hiflow_fast.bench.common import (
    Timing,
    add_common_arguments,
    bench_main,
    case_skip_reason,
    comma_list,
    device_heading,
    free_device_memory,
    make_record,
    markdown_table,
    matmul_rate,
    measure_time,
    peak_extra_bytes,
    start,
)
from hiflow_fast.errors import HiFlowInputError

BENCH_NAME = "transformer"
# Image tokens of a 1K/2K/4K target: (side / 16)^2.
SIZES = {"1k": 4096, "2k": 16384, "4k": 65536}
QUICK_SIZES = {"q256": 256, "q1k": 1024}
FLUX = dict(heads=24, head_dim=128, axes=(16, 56, 56), text=512, joint_dim=4096, pooled=768, in_channels=64)
QUICK = dict(heads=4, head_dim=32, axes=(8, 12, 12), text=64, joint_dim=64, pooled=32, in_channels=64)
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38
PATHS = ("stock", "hiflow-ref", "fast-tables", "fast")
NTK_FACTOR = 4.0  # a 4K stage's NTK factor; any value costs the same
MATH_MAX_TOKENS = 8192
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---- model and inputs ---------------------------------------------------------------------


def build_model(device, dtype, dims, double=1, single=1, seed=0):
    """FluxTransformer2DModel with `double` + `single` blocks and random weights, created
    directly in `dtype` on `device` (no fp32 copy of the weights)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(
                patch_size=1,
                in_channels=dims["in_channels"],
                num_layers=double,
                num_single_layers=single,
                attention_head_dim=dims["head_dim"],
                num_attention_heads=dims["heads"],
                joint_attention_dim=dims["joint_dim"],
                pooled_projection_dim=dims["pooled"],
                guidance_embeds=True,
                axes_dims_rope=tuple(dims["axes"]),
            )
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def block_pair(device, dtype, heads=24, head_dim=128, seed=0):
    """One double + one single block at the given width (Flux defaults), random weights."""
    dims = dict(FLUX, heads=heads, head_dim=head_dim)
    if heads * head_dim != 3072:
        dims["axes"] = (head_dim - 2 * (head_dim * 7 // 16), head_dim * 7 // 16, head_dim * 7 // 16)
    return build_model(device, dtype, dims, seed=seed)


def model_inputs(model, image_tokens: int, text_tokens: int, device, dtype, seed=0):
    side = int(math.isqrt(image_tokens))
    rows, cols = side, image_tokens // side
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    cfg = model.config
    kwargs = dict(
        hidden_states=torch.randn(1, rows * cols, cfg.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=ids.reshape(-1, 3),
        txt_ids=torch.zeros(text_tokens, 3),
    )
    return {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype) for k, v in kwargs.items()}


def block_inputs(model, inputs):
    """(hidden, encoder, temb) as the transformer's forward hands them to its first block."""
    with torch.no_grad():
        hidden = model.x_embedder(inputs["hidden_states"])
        temb = model.time_text_embed(
            inputs["timestep"].to(hidden.dtype) * 1000, inputs["guidance"].to(hidden.dtype) * 1000, inputs["pooled_projections"]
        )
        encoder = model.context_embedder(inputs["encoder_hidden_states"])
    return hidden, encoder, temb


class PathContext:
    """Enter one path's patch on the model (stock: nothing)."""

    def __init__(self, model, path: str, attention: str | None, kernels: str | None, **fast_kwargs):
        self.model, self.path, self.attention, self.kernels, self.fast_kwargs = model, path, attention, kernels, fast_kwargs
        self._cm = None
        self.patch = None

    def __enter__(self):
        if self.path == "stock":
            return self
        if self.path == "hiflow-ref":
            from hiflow_fast.transformer import patched_transformer

            self._cm = patched_transformer(self.model)
        else:
            from hiflow_fast.fast_transformer import fast_transformer

            self._cm = fast_transformer(self.model, attention=self.attention, kernels=self.kernels, **self.fast_kwargs)
        self.patch = self._cm.__enter__()
        self.patch.use_highres(NTK_FACTOR)
        if self.path == "fast-tables":
            self.patch.pos_embed.fused = False
        return self

    def __exit__(self, *exc):
        if self._cm is not None:
            return self._cm.__exit__(*exc)
        return False


def forward_fn(model, path: str, image_tokens: int, text_tokens: int, *, attention=None, kernels=None):
    """A zero-argument callable running one double + one single block on `path` (for the GPU
    memory test): it enters the path's patch, runs, and leaves it."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = model_inputs(model, image_tokens, text_tokens, device, dtype)

    def fn():
        with PathContext(model, path, attention, kernels), torch.no_grad():
            return model(**inputs, return_dict=False)[0]

    return fn


def peak_activation_bytes(fn, device) -> int | None:
    """Peak extra bytes of one fn() call, measured from a collected heap (bench/common.py)."""
    free_device_memory(device)
    return peak_extra_bytes(fn, device)


# ---- FLOPs and the matmul rate ------------------------------------------------------------


def block_flops(hidden: int, tokens: int) -> float:
    """24 d^2 L (q, k, v, out projections + 4x MLP, both block kinds) + 4 d L^2 (attention)."""
    return 24.0 * hidden**2 * tokens + 4.0 * hidden * tokens**2


def attention_flops(tokens: int, heads: int, head_dim: int) -> float:
    return 4.0 * tokens**2 * heads * head_dim


# ---- the benchmark ------------------------------------------------------------------------


def time_blocks(model, path, inputs, device, repeats, attention, kernels, chunk_tokens, warmup=1):
    """Timings and peaks of the double block, the single block and the RoPE embedding."""
    hidden, encoder, temb = block_inputs(model, inputs)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]], dim=0)
    results = {}
    with PathContext(model, path, attention, kernels, chunk_tokens=chunk_tokens), torch.no_grad():
        rope = model.pos_embed(ids)
        double, single = model.transformer_blocks[0], model.single_transformer_blocks[0]

        def run_double():
            return double(hidden_states=hidden.clone(), encoder_hidden_states=encoder.clone(), temb=temb, image_rotary_emb=rope)

        def run_single():
            return single(hidden_states=hidden.clone(), encoder_hidden_states=encoder.clone(), temb=temb, image_rotary_emb=rope)

        for name, fn in (("double", run_double), ("single", run_single), ("rope", lambda: model.pos_embed(ids))):
            timing = measure_time(fn, device, repeats=repeats, warmup=warmup)
            peak = peak_activation_bytes(fn, device) if name != "rope" else None
            results[name] = (timing, peak)
    return results


def time_attention(backends, tokens, dims, device, dtype, repeats, warmup=1, skipped=None):
    """Timings of each attention backend at `tokens`; a backend that raises (a forced SDPA kernel
    refusing the inputs, out of memory, ...) is left out and, with `skipped`, recorded there as
    backend -> reason."""
    from hiflow_fast.attention_backends import backend_info, get_attention_backend
    from hiflow_fast.errors import HiFlowInputError
    from hiflow_fast.ref.attention import proportional_attention_scale

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (1, tokens, dims["heads"], dims["head_dim"])
    q, k, v = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    scale = proportional_attention_scale(tokens, dims["head_dim"])
    out = {}
    for name in backends:
        if name == "sdpa-math" and tokens > MATH_MAX_TOKENS:
            continue
        if name == "triton" and device.type == "cpu" and tokens > 2048:
            continue  # the interpreter: correctness, not speed
        try:
            _, fn = get_attention_backend(name)
            backend_info(name).check(q, k, v)
        except HiFlowInputError:
            continue
        try:
            out[name] = measure_time(lambda fn=fn: fn(q, k, v, scale), device, repeats=repeats, warmup=warmup)
        except Exception as exc:
            reason = case_skip_reason(exc)
            print(f"  attention {name} at {tokens} tokens: skipped ({reason})")
            if skipped is not None:
                skipped[name] = reason
            free_device_memory(device)
    return out


def full_forward_peaks(device, dtype, image_tokens, dims, paths, attention, kernels, chunk_tokens, measure=None,
                       skipped=None):
    """Peak activation memory of one whole-transformer forward (19 + 38 blocks) per path:
    `measure(fn)` of a zero-argument forward (default: `peak_activation_bytes` on `device`).
    With `skipped`, a path that raises is recorded there (path -> reason) and the next one runs;
    without, the error propagates."""
    measure = measure or (lambda fn: peak_activation_bytes(fn, device))
    try:
        model = build_model(device, dtype, dims, double=DOUBLE_BLOCKS, single=SINGLE_BLOCKS)
        inputs = model_inputs(model, image_tokens, dims["text"], device, dtype)
    except Exception as exc:  # e.g. the 57-block model does not fit beside what is allocated
        if skipped is None:
            raise
        skipped.update(dict.fromkeys(paths, case_skip_reason(exc)))
        free_device_memory(device)
        return {}
    peaks = {}
    for path in paths:
        try:
            with PathContext(model, path, attention, kernels, chunk_tokens=chunk_tokens), torch.no_grad():
                peaks[path] = measure(lambda model=model: model(**inputs, return_dict=False)[0])
        except Exception as exc:
            if skipped is None:
                raise
            skipped[path] = case_skip_reason(exc)
            print(f"  full forward {path}: skipped ({skipped[path]})")
            free_device_memory(device)
    del model
    free_device_memory(device)
    return peaks


def compiled_pair(model, inputs, device, repeats, attention, kernels, chunk_tokens, swin_inputs):
    """The fast path through torch.compile + CUDA graphs on the block pair: median seconds of
    one forward and the warm-up seconds of each captured shape."""
    from hiflow_fast.fast_transformer import fast_transformer

    with fast_transformer(
        model, attention=attention, kernels=kernels, chunk_tokens=chunk_tokens, compile=True
    ) as patch, torch.no_grad():
        patch.use_highres(NTK_FACTOR)
        start = time.perf_counter()
        for x in (inputs, swin_inputs):
            model(**x, return_dict=False)
        warmup_s = time.perf_counter() - start
        timing = measure_time(lambda: model(**inputs, return_dict=False), device, repeats=repeats, warmup=1)
        return timing, warmup_s, patch.graph_stats()


def fmt_bytes(n):
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def parse_sizes(text: str | None, quick: bool) -> dict[str, int]:
    """Image-token counts by label: 1k, 2k, 4k (--quick: q256, q1k) or plain token counts."""
    sizes = QUICK_SIZES if quick else SIZES
    if not text:
        return dict(sizes)
    chosen = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        if item in sizes or item in SIZES:
            chosen[item] = sizes.get(item, SIZES.get(item))
        elif item.isdigit() and int(item) > 0:
            chosen[item] = int(item)
        else:
            raise HiFlowInputError("--sizes", item, "1k, 2k, 4k or a token count")
    if not chosen:
        raise HiFlowInputError("--sizes", text, "at least one size")
    return chosen


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hiflow-fast bench transformer", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    parser.add_argument("--sizes", default=None, help="comma list of 1k, 2k, 4k or image-token counts")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default bf16 (fp32 on CPU)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {', '.join(PATHS)}")
    parser.add_argument("--attention", default=None, help="attention backend of the fast path (default: registry's)")
    parser.add_argument("--kernels", default=None, help="fused-op kernels of the fast path: auto, triton, ref")
    parser.add_argument("--chunk-tokens", type=int, default=8192, help="MLP chunk of the fast path (tokens)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (CPU; the GPU timer warms up itself)")
    parser.add_argument("--no-attention", action="store_true", help="skip the attention backend table")
    parser.add_argument("--full", action="store_true", help="whole-transformer peak memory (19 + 38 blocks; GPU)")
    parser.add_argument("--compile", action="store_true", help="also time the fast path compiled + CUDA graphs (GPU)")
    parser.add_argument("--count-memory", action="store_true",
                        help="only count the peak activation memory of one whole-transformer forward (19 + 38 "
                             "blocks, FLUX.1-dev width, --dtype default bf16) at --sizes (default 4k) on fake "
                             "tensors: any machine, seconds, no timing")
    args = parser.parse_args(argv)
    args.paths = comma_list("--paths", args.paths, PATHS)
    if args.count_memory and args.sizes is None:
        args.sizes = "4k"
    args.sizes = parse_sizes(args.sizes, args.quick)
    return args


def counted_forward_peaks(image_tokens, dims, dtype, paths, attention, kernels, chunk_tokens):
    """{path: CountedPeak} of one whole-transformer forward (19 + 38 blocks) on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from hiflow_fast.bench.fake_memory import count_peak_bytes

    with FakeTensorMode():
        return full_forward_peaks(torch.device("cpu"), dtype, image_tokens, dims, paths, attention, kernels,
                                  chunk_tokens, measure=count_peak_bytes)


def _count_memory(args, device, outputs, environment) -> int:
    """--count-memory: counted peak activation memory per path and size, one table."""
    dtype = DTYPES[args.dtype or "bf16"]
    dtype_name = str(dtype).removeprefix("torch.")
    dims = QUICK if args.quick else FLUX
    # The GPU path's kernels: the fused q/k norm + RoPE custom op (its fake implementation is
    # what is counted; on a CPU Triton is switched to its interpreter, never run).
    kernels = args.kernels or "triton"
    rows, records = [], []
    for label, image_tokens in args.sizes.items():
        side = 2 * int(math.isqrt(image_tokens))
        peaks = counted_forward_peaks(image_tokens, dims, dtype, args.paths, args.attention, kernels, args.chunk_tokens)
        stock = peaks.get("stock")
        for path, counted in peaks.items():
            saving = None if stock is None else stock.peak_bytes - counted.peak_bytes
            records.append(make_record(
                f"{BENCH_NAME}.full_forward_peak_counted", device, path, None, counted.peak_bytes, environment,
                latent_hw=(side, side), image_tokens=image_tokens, text_tokens=dims["text"], dtype=dtype_name,
                blocks=[DOUBLE_BLOCKS, SINGLE_BLOCKS], method="fake-tensor count (bench/fake_memory.py)",
                kernels=kernels if path.startswith("fast") else None, chunk_tokens=args.chunk_tokens,
                retained_bytes=counted.retained_bytes, saving_vs_stock_bytes=saving, quick=args.quick,
            ))
            rows.append({"size": label, "tokens": image_tokens + dims["text"], "path": path,
                         "peak": fmt_bytes(counted.peak_bytes), "vs_stock": fmt_bytes(saving)})
            relation = "" if saving is None or path == "stock" else (
                f" ({fmt_bytes(saving)} below stock)" if saving >= 0 else f" ({fmt_bytes(-saving)} above stock)")
            print(f"  {label} {path}: counted peak activations {fmt_bytes(counted.peak_bytes)}{relation}")
    outputs.add(records)
    table = markdown_table(rows, [("size", "size"), ("tokens", "tokens"), ("path", "path"),
                                  ("peak activations (counted)", "peak"), ("stock minus this", "vs_stock")])
    title = (f"Peak activation memory of one forward ({DOUBLE_BLOCKS} + {SINGLE_BLOCKS} blocks, "
             f"{'quick dims' if args.quick else 'FLUX.1-dev width'}, {dtype_name}), counted on fake tensors")
    markdown = f"# {title}\n\nCommit {environment['commit']}; no GPU involved (see bench/fake_memory.py).\n\n{table}\n"
    print()
    print(table)
    outputs.finish(markdown, title=title)
    return 0


def _main(argv: list[str] | None) -> int:
    args = _parse(argv)
    device, outputs, environment = start(args)
    from hiflow_fast.interpreter import prepare_interpreter

    # Triton on a CPU runs its interpreter, which must be chosen before diffusers imports triton.
    prepare_interpreter("triton" if args.count_memory and not args.kernels else args.kernels, args.attention)
    if args.count_memory:
        return _count_memory(args, device, outputs, environment)
    paths, sizes = args.paths, args.sizes
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    dims = QUICK if args.quick else FLUX
    hidden = dims["heads"] * dims["head_dim"]
    repeats = max(1, args.repeats)
    if device.type == "cpu" and not args.quick and not args.sizes:
        print("note: FLUX.1-dev width on a CPU is slow; --quick runs tiny sizes", file=sys.stderr)

    rate_dtype = dtype if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, rate_dtype, n=1024 if args.quick or device.type == "cpu" else 8192)
    print(f"device: {environment['device_name']}; measured matmul rate {rate / 1e12:.2f} TFLOP/s ({rate_dtype})")
    from hiflow_fast.attention_backends import available_backends

    model = build_model(device, dtype, dims)
    block_rows, step_rows, attn_rows = [], [], []
    for label, image_tokens in sizes.items():
        tokens = image_tokens + dims["text"]
        inputs = model_inputs(model, image_tokens, dims["text"], device, dtype)
        flops = block_flops(hidden, tokens)
        step_flops = (DOUBLE_BLOCKS + SINGLE_BLOCKS) * flops
        floor_s = step_flops / rate
        side = 2 * int(math.isqrt(image_tokens))
        extra_common = dict(image_tokens=image_tokens, text_tokens=dims["text"], hidden=hidden, dtype=dtype_name,
                            matmul_rate_flops=rate, quick=args.quick)

        def write(kind, path, timing, peak, **extra):
            """One case of this size, into the JSON as soon as it is measured (gpu_check stops a
            step at its budget)."""
            outputs.add([make_record(f"{BENCH_NAME}.{kind}", device, path, timing, peak, environment,
                                     latent_hw=(side, side), **extra, **extra_common)])

        for path in paths:
            try:
                res = time_blocks(model, path, inputs, device, repeats, args.attention, args.kernels, args.chunk_tokens, args.warmup)
            except Exception as exc:
                reason = case_skip_reason(exc)
                print(f"  {label} {path}: skipped ({reason})")
                write("step_estimate", path, None, None, floor_s=floor_s, flops=step_flops, skipped=reason)
                free_device_memory(device)
                continue
            (t_d, p_d), (t_s, p_s), (t_r, _) = res["double"], res["single"], res["rope"]
            step_s = DOUBLE_BLOCKS * t_d.median_s + SINGLE_BLOCKS * t_s.median_s + t_r.median_s
            for block, timing, peak in (("double", t_d, p_d), ("single", t_s, p_s)):
                fraction = flops / timing.median_s / rate
                write(f"{block}_block", path, timing, peak, floor_s=flops / rate, flops=flops)
                block_rows.append({"size": label, "tokens": tokens, "block": block, "path": path,
                                   "median_ms": timing.median_s * 1e3, "TFLOP/s": flops / timing.median_s / 1e12,
                                   "of_matmul": fraction, "peak": fmt_bytes(peak)})
            peak_block = max(filter(None, [p_d, p_s]), default=None)
            write("step_estimate", path, Timing(step_s, step_s, step_s, 1), peak_block, floor_s=floor_s,
                  flops=step_flops, rope_s=t_r.median_s)
            step_rows.append({"size": label, "path": path, "step_s": step_s, "floor_s": floor_s,
                              "x_floor": step_s / floor_s, "peak_block": fmt_bytes(peak_block)})
            print(f"  {label} {path}: double {t_d.median_s * 1e3:.1f} ms, single {t_s.median_s * 1e3:.1f} ms, "
                  f"step ~{step_s:.3f} s = {step_s / floor_s:.2f}x floor, peaks {fmt_bytes(p_d)} / {fmt_bytes(p_s)}")
            free_device_memory(device)

        if not args.no_attention:
            attention_skipped: dict[str, str] = {}
            timings = time_attention(available_backends(), tokens, dims, device, dtype, repeats, args.warmup,
                                     skipped=attention_skipped)
            fl = attention_flops(tokens, dims["heads"], dims["head_dim"])
            attention_case = dict(floor_s=fl / rate, flops=fl, heads=dims["heads"], head_dim=dims["head_dim"])
            sdpa_best = min((t.median_s for n, t in timings.items() if n.startswith("sdpa")), default=None)
            for name, timing in timings.items():
                ratio = timing.median_s / sdpa_best if sdpa_best else None
                write("attention", name, timing, None, vs_fastest_sdpa=ratio, **attention_case)
                attn_rows.append({"size": label, "tokens": tokens, "backend": name, "median_ms": timing.median_s * 1e3,
                                  "TFLOP/s": fl / timing.median_s / 1e12, "of_matmul": fl / timing.median_s / rate,
                                  "vs_fastest_sdpa": ratio})
            for name, reason in attention_skipped.items():
                write("attention", name, None, None, skipped=reason, **attention_case)

        if args.compile and device.type == "cuda":
            swin = model_inputs(model, (int(math.isqrt(image_tokens)) + 1) ** 2, dims["text"], device, dtype, seed=1)
            try:
                timing, warm_s, stats = compiled_pair(model, inputs, device, repeats, args.attention, args.kernels,
                                                      args.chunk_tokens, swin)
            except Exception as exc:  # a compile or CUDA-graph capture error
                reason = case_skip_reason(exc)
                print(f"  {label} fast compiled + graphs: skipped ({reason})")
                write("pair_compiled", "fast-compiled", None, None, skipped=reason)
                free_device_memory(device)
            else:
                write("pair_compiled", "fast-compiled", timing, None, warmup_s=warm_s, graphs=stats)
                print(f"  {label} fast compiled + graphs: pair {timing.median_s * 1e3:.1f} ms, warm-up {warm_s:.1f} s {stats}")

        if args.full and device.type == "cuda":
            full_paths = [p for p in ("stock", "fast") if p in paths]
            full_skipped: dict[str, str] = {}
            peaks = full_forward_peaks(device, dtype, image_tokens, dims, full_paths, args.attention, args.kernels,
                                       args.chunk_tokens, skipped=full_skipped)
            for path, peak in peaks.items():
                write("full_forward_peak", path, None, peak)  # memory only: no timing (median_s null)
                print(f"  {label} full forward ({DOUBLE_BLOCKS}+{SINGLE_BLOCKS} blocks) {path}: peak activations {fmt_bytes(peak)}")
            for path, reason in full_skipped.items():
                write("full_forward_peak", path, None, None, skipped=reason)

    tables = [
        markdown_table(block_rows, [(h, h) for h in ("size", "tokens", "block", "path", "median_ms", "TFLOP/s", "of_matmul", "peak")]),
        markdown_table(step_rows, [(h, h) for h in ("size", "path", "step_s", "floor_s", "x_floor", "peak_block")]),
    ]
    if attn_rows:
        tables.append(markdown_table(attn_rows, [(h, h) for h in ("size", "tokens", "backend", "median_ms", "TFLOP/s", "of_matmul", "vs_fastest_sdpa")]))
    heading = device_heading(environment, device)
    text = "\n\n".join(tables)
    print(text)
    markdown = f"# transformer blocks at FLUX width ({heading}, commit {environment['commit']})\n\n{text}\n"
    outputs.finish(markdown, title=f"transformer -- {heading}")
    return outputs.exit_status


main = bench_main(_main)

if __name__ == "__main__":
    sys.exit(main())
