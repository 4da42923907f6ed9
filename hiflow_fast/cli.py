"""The `hiflow-fast` command.

    hiflow-fast generate [options]      generate an image (defaults: the embedded tiny model)
    hiflow-fast bench NAME [options]    run a benchmark (guidance, transformer, ...)

Bad input ends with one line on stderr naming the setting, what it got and what is allowed,
and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.resources
import json
import logging
import os
import sys
from typing import Sequence

from .errors import HiFlowInputError, HiFlowModelError, NonFiniteLatentsError
from .memory_cli import add_memory_arguments
from .memory_plan import HiFlowOutOfMemoryError

DTYPES = ("float32", "bfloat16", "float16")


def embedded_model_dir() -> str:
    """The tiny random Flux shipped with the package (runs anywhere, in seconds, on a CPU)."""
    return str(importlib.resources.files("hiflow_fast") / "assets" / "tiny_flux")


# Stage plans: the official FLUX.1-dev plan, and a small one sized for the embedded tiny model.
PRESETS = {
    "official": dict(
        size="1024x1024", steps=30, guidance=3.5, target_sizes="2048x2048,4096x4096", highres_steps="16,10",
        highres_guidance="4.5,6", filter_ratio="0.2,0.2", alphas="1.0,0.25", betas="0.5,0.5", ntk="10,10",
    ),
    "tiny": dict(
        size="256x256", steps=8, guidance=3.5, target_sizes="512x512,1024x1024", highres_steps="4,3",
        highres_guidance="4.5,6", filter_ratio="0.2,0.2", alphas="1.0,0.25", betas="0.5,0.5", ntk="10,10",
    ),
}


def _parse_size(field: str, text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise HiFlowInputError(field, text, "HEIGHTxWIDTH in pixels, e.g. 1024x1024")
    return int(parts[0]), int(parts[1])


def _parse_list(field: str, text: str, kind=float) -> list:
    try:
        return [kind(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise HiFlowInputError(field, text, f"a comma-separated list of {kind.__name__}s, one per high-res stage") from None


def _build_config(args):
    from .config import HiFlowConfig

    preset = PRESETS[args.preset or ("tiny" if args.model is None else "official")]
    value = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    height, width = _parse_size("--size", value("size"))
    targets = [_parse_size("--target-sizes", s) for s in str(value("target_sizes")).split(",") if s.strip()]
    sigma = args.sharpening_sigma
    if sigma != "seeded":
        try:
            sigma = float(sigma)
        except ValueError:
            raise HiFlowInputError("--sharpening-sigma", sigma, "a number > 0 or 'seeded'") from None
    params = {
        "height": height,
        "width": width,
        "num_inference_steps": int(value("steps")),
        "guidance_scale": float(value("guidance")),
        "target_heights": [h for h, _ in targets],
        "target_widths": [w for _, w in targets],
        "num_inference_steps_highres": _parse_list("--highres-steps", value("highres_steps"), int),
        "guidance_scale_highres": _parse_list("--highres-guidance", value("highres_guidance")),
        "filter_ratio": _parse_list("--filter-ratio", value("filter_ratio")),
        "alphas": _parse_list("--alphas", value("alphas")),
        "betas": _parse_list("--betas", value("betas")),
        "ntk_factor": _parse_list("--ntk", value("ntk")),
        "structure_guidance": args.structure_guidance,
        "upsampling_choice": args.upsampling,
        "swin_pachify": not args.no_swin,
        "proportional_attention": not args.no_proportional_attention,
        "text_duplication": args.text_duplication,
    }
    names = {
        "target_heights": "--target-sizes", "num_inference_steps_highres": "--highres-steps",
        "guidance_scale_highres": "--highres-guidance", "filter_ratio": "--filter-ratio", "alphas": "--alphas",
        "betas": "--betas", "ntk_factor": "--ntk",
    }
    n = len(targets)
    for key, flag in names.items():
        if len(params[key]) != n:
            raise HiFlowInputError(flag, ",".join(map(str, params[key])), f"{n} values, one per stage of --target-sizes")
    config = HiFlowConfig.from_official_kwargs(params, sharpening_sigma=sigma, official_compat=args.official_compat)
    return config, params


def _load_prompt_embeds(path: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise HiFlowInputError("--prompt-embeds", path, "an existing .safetensors file")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise HiFlowInputError("--prompt-embeds", path, f"a readable safetensors file ({exc})") from None
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(tensors)
    if missing:
        raise HiFlowInputError("--prompt-embeds", path, f"a file with the tensors prompt_embeds and pooled_prompt_embeds (missing {sorted(missing)})")
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]


def _save_png(image, path: str, metadata: dict, overwrite: bool) -> None:
    from PIL.PngImagePlugin import PngInfo

    from .io import atomic_write

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    info.add_text("Software", "hiflow_fast")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info), overwrite=overwrite)


def _generate(args) -> int:
    import torch

    from .interpreter import prepare_interpreter

    # Triton on a CPU runs its interpreter, which must be chosen before diffusers imports triton.
    prepare_interpreter(args.backend, args.attention)
    from .pipeline import HiFlowPipeline

    config, params = _build_config(args)
    output = args.output
    if not output.lower().endswith(".png"):
        raise HiFlowInputError("--output", output, "a .png path")
    stage_paths = []
    if args.save_stages:
        stem = output[:-4]
        stage_paths = [f"{stem}_stage{k}.png" for k in range(len(config.stages) + 1)]
    for path in [output, *stage_paths]:
        if os.path.exists(path) and not args.overwrite:
            raise HiFlowInputError("--output", path, "a path that does not exist yet (pass --overwrite to replace it)")
    model_dir = args.model or embedded_model_dir()
    if not os.path.isdir(model_dir):
        raise HiFlowModelError(f"model folder {model_dir!r} does not exist")
    dtype = getattr(torch, args.dtype)
    pipe = HiFlowPipeline.from_pretrained(model_dir, torch_dtype=dtype, device=args.device)
    prompt, embeds, pooled = args.prompt, None, None
    if args.prompt_embeds:
        embeds, pooled = _load_prompt_embeds(args.prompt_embeds)
    elif prompt is None:
        bundled = os.path.join(model_dir, "prompt_embeds.safetensors")
        if not os.path.isfile(bundled):
            raise HiFlowInputError("--prompt", None, "a prompt or --prompt-embeds FILE (this model ships no prompt embeddings)")
        embeds, pooled = _load_prompt_embeds(bundled)
    if prompt is not None and args.prompt_embeds:
        raise HiFlowInputError("--prompt", prompt, "either --prompt or --prompt-embeds, not both")
    out = pipe(
        prompt,
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        config=config,
        seed=args.seed,
        output_type="pil",
        return_stage_images=args.save_stages,
        backend=args.backend,
        attention=args.attention,
        compile=args.compile,
        progress=not args.quiet,
        memory_budget=args.memory_budget,  # hiflow_fast.memory_cli adds --memory-budget
    )
    metadata = {
        "generator": "hiflow_fast",
        "model": os.path.abspath(model_dir) if args.model else "embedded tiny random Flux",
        "prompt": prompt,
        "prompt_embeds": args.prompt_embeds,
        "seed": out.seed,
        "dtype": args.dtype,
        "sharpening_sigma": config.sharpening_sigma if isinstance(config.sharpening_sigma, (str, float)) else list(config.sharpening_sigma),
        "official_compat": config.official_compat,
        **params,
    }
    for k, (path, image) in enumerate(zip(stage_paths, out.stage_images)):
        _save_png(image[0], path, {**metadata, "stage": k}, args.overwrite)
    _save_png(out.images[0], output, metadata, args.overwrite)
    if not args.quiet:
        print(f"wrote {output} ({out.images[0].width}x{out.images[0].height}, seed {out.seed})")
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate an image with HiFlow", description="Generate an image with HiFlow.")
    p.add_argument("--prompt", help="text prompt (needs a model with text encoders)")
    p.add_argument("--prompt-embeds", help="safetensors file with prompt_embeds [B,T,D] and pooled_prompt_embeds [B,D]")
    p.add_argument("--model", help="diffusers-format Flux folder (default: the embedded tiny random model)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="stage plan defaults (default: tiny for the embedded model, else official)")
    p.add_argument("--size", help="base size HEIGHTxWIDTH")
    p.add_argument("--steps", type=int, help="base-stage steps")
    p.add_argument("--guidance", type=float, help="base-stage guidance scale")
    p.add_argument("--target-sizes", help="high-res stage sizes, e.g. 2048x2048,4096x4096")
    p.add_argument("--highres-steps", help="steps per high-res stage, e.g. 16,10")
    p.add_argument("--highres-guidance", help="guidance per high-res stage")
    p.add_argument("--filter-ratio", help="Butterworth ratio per high-res stage")
    p.add_argument("--alphas", help="direction-alignment weight per stage")
    p.add_argument("--betas", help="acceleration-alignment weight per stage")
    p.add_argument("--ntk", help="RoPE NTK factor per stage")
    p.add_argument("--structure-guidance", choices=["fft", "dwt"], default="fft")
    p.add_argument("--upsampling", choices=["latent", "pixel"], default="latent")
    p.add_argument("--no-swin", action="store_true", help="disable swin patchify")
    p.add_argument("--no-proportional-attention", action="store_true")
    p.add_argument("--text-duplication", action="store_true")
    p.add_argument("--sharpening-sigma", default="seeded", help="blur sigma of the sharpening, or 'seeded' (official draws)")
    p.add_argument("--official-compat", action="store_true", help="return the padded size and always use proportional attention, as the official code")
    p.add_argument("--seed", type=int, help="random seed (default: a fresh one, stored in the PNG)")
    p.add_argument("--output", default="hiflow.png", help="output PNG (never overwritten without --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--save-stages", action="store_true", help="also write OUTPUT_stageK.png for every stage")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--backend", help="guidance backend: ref or triton (default: $HIFLOW_BACKEND or automatic)")
    p.add_argument("--attention", help="attention backend (default: $HIFLOW_ATTENTION or sdpa)")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (+ CUDA graphs on a GPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary line")
    p.set_defaults(run=_generate)


def _bench(args) -> int:
    name = args.name
    try:
        module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"hiflow_fast.bench.bench_{name}":
            raise
        raise HiFlowInputError("bench", name, f"one of the benchmarks: {', '.join(available_benchmarks())}") from None
    return int(module.main(list(args.bench_args)) or 0)


def available_benchmarks() -> list[str]:
    folder = importlib.resources.files("hiflow_fast.bench")
    return sorted(p.name[len("bench_"):-3] for p in folder.iterdir() if p.name.startswith("bench_") and p.name.endswith(".py"))


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="run the benchmarks", description="Run a benchmark: hiflow-fast bench [NAME] [options].")
    p.add_argument("name", nargs="?", default="all", help="all (default), guidance, transformer, vae or e2e (NAME --help: its options)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=_bench)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hiflow-fast", description="Fast, faithful HiFlow for Flux.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_bench(sub)
    add_memory_arguments(sub)  # `plan` and generate --memory-budget (hiflow_fast.memory_cli)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (HiFlowInputError, HiFlowModelError, NonFiniteLatentsError, HiFlowOutOfMemoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
