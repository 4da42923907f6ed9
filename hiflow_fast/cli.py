"""The `hiflow-fast` command.

    hiflow-fast generate [options]      generate an image (defaults: the embedded tiny model)
    hiflow-fast bench [NAME] [options]  run a benchmark (default: all; NAME --help: its options)
    hiflow-fast --version

Every input that can be checked before the weights are loaded is checked then: the settings,
the device, the backends, the model folder's files, the prompt embeddings and every output
path. Bad input ends with one line on stderr, `error: FLAG=VALUE ... is not allowed: WHAT IS`,
naming the flag as typed, and exit status 2; no traceback unless --debug. A failure that can
only show up during the run (NaN/Inf, out of memory) is one line naming the stage, exit 2.
Output files are written all-or-nothing: on any failure or Ctrl-C nothing is left behind.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.resources
import json
import logging
import math
import os
import re
import sys
from typing import Any, Sequence

from . import __version__
from .errors import HiFlowInputError, HiFlowModelError, NonFiniteLatentsError, ParallelDivergenceError, StageOutOfMemoryError
from .memory_cli import add_memory_arguments
from .parallel import is_main_process

DTYPES = ("float32", "bfloat16", "float16")


def embedded_model_dir() -> str:
    """The tiny random Flux shipped with the package (runs anywhere, in seconds, on a CPU)."""
    return str(importlib.resources.files("hiflow_fast") / "assets" / "tiny_flux")


# Stage plans: the official FLUX.1-dev plan, and a small one sized for the embedded tiny model.
# With another number of --target-sizes, stage k takes the preset's k-th value, or its last.
PRESETS = {
    "official": dict(
        size="1024x1024", steps="30", guidance="3.5", target_sizes="2048x2048,4096x4096", highres_steps="16,10",
        highres_guidance="4.5,6", filter_ratio="0.2,0.2", alphas="1.0,0.25", betas="0.5,0.5", ntk="10,10",
    ),
    "tiny": dict(
        size="256x256", steps="8", guidance="3.5", target_sizes="512x512,1024x1024", highres_steps="4,3",
        highres_guidance="4.5,6", filter_ratio="0.2,0.2", alphas="1.0,0.25", betas="0.5,0.5", ntk="10,10",
    ),
}

# Per-stage options: (attribute, flag, element type, HiResStage field).
STAGE_OPTIONS = (
    ("highres_steps", "--highres-steps", int, "steps"),
    ("highres_guidance", "--highres-guidance", float, "guidance_scale"),
    ("filter_ratio", "--filter-ratio", float, "filter_ratio"),
    ("alphas", "--alphas", float, "alpha"),
    ("betas", "--betas", float, "beta"),
    ("ntk", "--ntk", float, "ntk_factor"),
)

# API field -> the flag that sets it, for error messages.
_FLAG_OF_FIELD = {
    "height": "--size", "width": "--size", "height/width": "--size",
    "num_inference_steps": "--steps", "guidance_scale": "--guidance",
    "sharpening_sigma": "--sharpening-sigma", "structure_guidance": "--structure-guidance",
    "upsampling": "--upsampling", "seed": "--seed", "device": "--device", "torch_dtype": "--dtype",
    "backend": "--backend", "kernels": "--backend", "attention": "--attention",
    "prompt": "--prompt", "prompt_embeds": "--prompt-embeds", "pooled_prompt_embeds": "--prompt-embeds",
    "num_images_per_prompt": "--prompt-embeds", "model_dir": "--model", "output": "--output",
    "memory_budget": "--memory-budget", "lossy": "--lossy", "compile": "--compile",
}
_FLAG_OF_STAGE_FIELD = {"height": "--target-sizes", "width": "--target-sizes", "height/width": "--target-sizes"}
_FLAG_OF_STAGE_FIELD.update({field: flag for _, flag, _, field in STAGE_OPTIONS})
_STAGE_FIELD = re.compile(r"^stages\[(\d+)\]\.(.+)$")


class UsageError(Exception):
    """argparse's complaint (unknown option, missing value, bad choice), as one line."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised (printed by `main` as one `error:` line)
    instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; switches say they are off by default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        return f"{text} (default: %(default)s)"


def _typed(flags: set[str], argv: Sequence[str]) -> set[str]:
    """The flags among `flags` that appear in argv (as `--flag value` or `--flag=value`)."""
    return {token.split("=", 1)[0] for token in argv if token.split("=", 1)[0] in flags}


_NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def join_negative_values(argv: Sequence[str], value_flags: set[str]) -> list[str]:
    """`--flag -0.1,0.2` -> `--flag=-0.1,0.2`: argparse takes a value starting with '-' for an
    option unless it is a plain negative number, so negative lists, -inf and -nan would need
    the `=` form otherwise."""
    out: list[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token in value_flags and i + 1 < len(tokens) and _NEGATIVE_VALUE.match(tokens[i + 1]):
            out.append(f"{token}={tokens[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def cli_error(exc: HiFlowInputError, typed: set[str] = frozenset(), preset: str | None = None) -> HiFlowInputError:
    """The error with its API field renamed to the flag that sets it. A value the user did not
    type (a preset default) says so."""
    match = _STAGE_FIELD.match(exc.field)
    flag = _FLAG_OF_STAGE_FIELD.get(match.group(2)) if match else _FLAG_OF_FIELD.get(exc.field)
    if flag is None:
        return exc
    where = exc.where
    if preset and flag not in typed and flag not in ("--device", "--output", "--model", "--prompt", "--prompt-embeds", "--seed"):
        where = f"{where}, " if where else ""
        where += f"the default of --preset {preset}"
    allowed = exc.allowed.replace("num_inference_steps=", "--steps=")
    return exc.renamed(flag, where=where, allowed=allowed)


def _parse_size(flag: str, text: str) -> tuple[int, int]:
    parts = text.strip().lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise HiFlowInputError(flag, text, "HEIGHTxWIDTH in pixels, e.g. 1024x1024")
    return int(parts[0]), int(parts[1])


def _parse_number(flag: str, text: str, kind):
    try:
        return kind(text.strip())
    except (ValueError, AttributeError):
        noun = "an integer" if kind is int else "a number"
        raise HiFlowInputError(flag, text, noun) from None


def _parse_list(flag: str, text: str, kind) -> list:
    items = [item for item in str(text).split(",")]
    if not items or any(not item.strip() for item in items):
        raise HiFlowInputError(flag, text, f"a comma-separated list of {'integers' if kind is int else 'numbers'}, one per high-res stage")
    try:
        return [kind(item.strip()) for item in items]
    except ValueError:
        raise HiFlowInputError(
            flag, text, f"a comma-separated list of {'integers' if kind is int else 'numbers'}, one per high-res stage"
        ) from None


def build_config(args, typed: set[str] = frozenset()):
    """The HiFlowConfig of the command line, and the official-style parameters for the PNG.
    Errors name the flag the user typed (a preset's default is named as such)."""
    from .config import HiFlowConfig, HiResStage

    preset_name = args.preset or ("tiny" if args.model is None else "official")
    preset = PRESETS[preset_name]
    text = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    try:
        height, width = _parse_size("--size", text("size"))
        steps = _parse_number("--steps", text("steps"), int)
        guidance = _parse_number("--guidance", text("guidance"), float)
        targets = [_parse_size("--target-sizes", s) for s in _parse_list_text("--target-sizes", text("target_sizes"))]
        n = len(targets)
        per_stage: dict[str, list] = {}
        for name, flag, kind, field in STAGE_OPTIONS:
            if getattr(args, name) is not None:
                values = _parse_list(flag, getattr(args, name), kind)
                if len(values) == 1:
                    values = values * n
                elif len(values) != n:
                    raise HiFlowInputError(
                        flag, getattr(args, name),
                        f"1 value (used for every stage) or {n} values, one per --target-sizes entry "
                        f"({','.join(f'{h}x{w}' for h, w in targets)})",
                    )
            else:
                # Defaults follow the number of stages: stage k takes the preset's k-th value, or its last.
                values = _parse_list(flag, preset[name], kind)
                values = [values[min(k, len(values) - 1)] for k in range(n)]
                if field == "steps":
                    # A stage runs the last `steps` base timesteps, so a default never exceeds --steps.
                    values = [min(v, steps) if isinstance(steps, int) and steps >= 1 else v for v in values]
            per_stage[field] = values
        sigma: Any = args.sharpening_sigma
        if sigma != "seeded":
            sigma = _parse_number("--sharpening-sigma", sigma, float)
        stages = tuple(
            HiResStage(h, w, **{field: per_stage[field][k] for field in per_stage}) for k, (h, w) in enumerate(targets)
        )
        config = HiFlowConfig(
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            stages=stages,
            structure_guidance=args.structure_guidance,
            upsampling=args.upsampling,
            swin_patchify=not args.no_swin,
            proportional_attention=not args.no_proportional_attention,
            text_duplication=args.text_duplication,
            sharpening_sigma=sigma,
            official_compat=args.official_compat,
        )
    except HiFlowInputError as exc:
        error = cli_error(exc, typed, preset_name)
        # Sizes are shown as typed, HEIGHTxWIDTH, not one side.
        match = _STAGE_FIELD.match(exc.field)
        if error.field == "--size" and "height" in locals():
            error = error.renamed("--size", value=f"{height}x{width}")
        elif error.field == "--target-sizes" and match and "targets" in locals():
            h, w = targets[int(match.group(1))]
            error = error.renamed("--target-sizes", value=f"{h}x{w}")
        raise error from None
    params = {
        "size": f"{config.height}x{config.width}",
        "height": config.height,
        "width": config.width,
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "target_sizes": [f"{s.height}x{s.width}" for s in config.stages],
        "target_heights": [s.height for s in config.stages],
        "target_widths": [s.width for s in config.stages],
        "num_inference_steps_highres": [s.steps for s in config.stages],
        "guidance_scale_highres": [s.guidance_scale for s in config.stages],
        "filter_ratio": [s.filter_ratio for s in config.stages],
        "alphas": [s.alpha for s in config.stages],
        "betas": [s.beta for s in config.stages],
        "ntk_factor": [s.ntk_factor for s in config.stages],
        "structure_guidance": config.structure_guidance,
        "upsampling_choice": config.upsampling,
        "swin_pachify": config.swin_patchify,
        "proportional_attention": config.proportional_attention,
        "text_duplication": config.text_duplication,
    }
    return config, params


def _parse_list_text(flag: str, text: str) -> list[str]:
    items = str(text).split(",")
    if any(not item.strip() for item in items):
        raise HiFlowInputError(flag, text, "a comma-separated list of HEIGHTxWIDTH, e.g. 2048x2048,4096x4096")
    return items


def _load_prompt_embeds(path: str, flag: str, transformer_config: dict, max_sequence_length: int):
    """prompt_embeds and pooled_prompt_embeds from a safetensors file, checked (shape, dtype,
    finiteness, length) against the model's config before any weights are loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checks import check_prompt_embeds, check_safetensors_file

    check_safetensors_file(path, flag)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise HiFlowInputError(flag, path, f"a readable safetensors file ({exc})") from None
    missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(tensors)
    if missing:
        raise HiFlowInputError(
            flag, path, f"a file with the tensors prompt_embeds and pooled_prompt_embeds (missing: {', '.join(sorted(missing))})"
        )
    embeds, pooled = tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]
    try:
        check_prompt_embeds(
            embeds,
            pooled,
            joint_attention_dim=transformer_config["joint_attention_dim"],
            pooled_projection_dim=transformer_config["pooled_projection_dim"],
            max_sequence_length=max_sequence_length,
        )
    except HiFlowInputError as exc:
        raise HiFlowInputError(flag, path, f"{exc.field}: {exc.allowed} (got {exc.value})") from None
    return embeds, pooled


def output_paths(output: str, batch: int, stages: int, save_stages: bool) -> tuple[list[str], list[list[str]]]:
    """The files of a run. One image: OUTPUT.png; a batch of B: OUTPUT_0.png ... OUTPUT_{B-1}.png.
    With --save-stages, each image's stage k (0 = base, the last = the final image) is
    OUTPUT_stageK.png, or OUTPUT_I_stageK.png in a batch."""
    stem = output[: -len(".png")]
    names = [stem] if batch == 1 else [f"{stem}_{i}" for i in range(batch)]
    images = [f"{name}.png" for name in names]
    stage_images = [[f"{name}_stage{k}.png" for k in range(stages + 1)] if save_stages else [] for name in names]
    return images, stage_images


def _png_writer(image, metadata: dict):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(metadata, sort_keys=True))
    info.add_text("Software", f"hiflow_fast {__version__}")
    return lambda tmp: image.save(tmp, format="PNG", pnginfo=info)


def _version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _rank_prefix() -> str:
    return f"rank {os.environ['RANK']}: " if "RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""


def parallel_spec_from_args(args, attention: str):
    """The --parallel spec (None without the flag), checked against the other flags; no work."""
    if args.parallel is None:
        return None
    from .parallel import ParallelSpec, check_backend, check_launch

    spec = ParallelSpec.parse(args.parallel, "--parallel")
    check_backend(spec, attention, "--attention")
    timeout = _parse_number("--parallel-timeout", args.parallel_timeout, float)
    if not (math.isfinite(timeout) and timeout > 0):
        raise HiFlowInputError("--parallel-timeout", args.parallel_timeout, "a number of seconds > 0")
    args.parallel_timeout = timeout
    if args.compile:
        raise HiFlowInputError("--compile", True, "off with --parallel (CUDA graphs are not captured across ranks)")
    if getattr(args, "memory_budget", None) is not None:
        raise HiFlowInputError("--memory-budget", args.memory_budget, "none with --parallel (streaming is not planned per rank yet)")
    check_launch(spec, args.device, "--parallel")
    return spec


def _generate(args, typed: set[str]) -> int:
    import torch

    from .checks import check_device, check_model_dir
    from .interpreter import prepare_interpreter
    from .io import OutputSet, check_output_paths

    def named(exc: HiFlowInputError) -> HiFlowInputError:
        return cli_error(exc)

    # 1. Settings, device and backends: nothing read from disk yet.
    config, params = build_config(args, typed)
    try:
        seed = None if args.seed is None else _parse_number("--seed", args.seed, int)
        if seed is not None and not 0 <= seed < 2**63:
            raise HiFlowInputError("--seed", args.seed, "an integer from 0 to 2**63 - 1")
        device = check_device(args.device, "--device")
        # Triton on a CPU runs its interpreter, which must be chosen before diffusers imports triton.
        prepare_interpreter(args.backend, args.attention)
        from .attention_backends import resolve_backend_name
        from .backend import resolve_backend

        backend = resolve_backend(args.backend, device=device, field="--backend")
        attention = resolve_backend_name(args.attention)
    except HiFlowInputError as exc:
        raise named(exc) from None
    spec = parallel_spec_from_args(args, attention)
    output = args.output
    if not output.lower().endswith(".png"):
        raise HiFlowInputError("--output", output, "a .png path")
    if args.prompt is not None and args.prompt_embeds:
        raise HiFlowInputError("--prompt", args.prompt, "either --prompt or --prompt-embeds, not both")

    # 2. The model folder's files and the prompt embeddings (no weights yet).
    model_dir = args.model or embedded_model_dir()
    try:
        transformer_config = check_model_dir(model_dir, "--model")
    except HiFlowInputError as exc:
        raise named(exc) from None
    if spec is not None:
        from .parallel import check_heads

        check_heads(spec, int(transformer_config.get("num_attention_heads", 0)), "--parallel")
    if args.memory_budget is not None or args.lossy is not None:  # hiflow_fast.memory_cli adds both flags
        from .memory_plan import check_budget_without_weights

        check_budget_without_weights(args.memory_budget, transformer_config, config, args.dtype, compile=args.compile,
                                     field="--memory-budget", lossy=args.lossy)
    prompt, embeds, pooled = args.prompt, None, None
    if args.prompt_embeds:
        embeds, pooled = _load_prompt_embeds(args.prompt_embeds, "--prompt-embeds", transformer_config, config.max_sequence_length)
    elif prompt is None:
        bundled = os.path.join(model_dir, "prompt_embeds.safetensors")
        if not os.path.isfile(bundled):
            raise HiFlowInputError("--prompt", None, "a prompt or --prompt-embeds FILE (this model ships no prompt embeddings)")
        embeds, pooled = _load_prompt_embeds(bundled, "--model", transformer_config, config.max_sequence_length)
    elif not all(os.path.isdir(os.path.join(model_dir, sub)) for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")):
        raise HiFlowInputError("--prompt", prompt, "--prompt-embeds FILE instead: this model has no text encoders")

    # 3. Every output path, before the weights are loaded.
    batch = 1 if embeds is None else int(embeds.shape[0])
    images, stage_images = output_paths(output, batch, len(config.stages), args.save_stages)
    sizes = [(config.height, config.width)] + [(s.height, s.width) for s in config.stages]
    final = sizes[-1]
    paths = [*images, *(p for each in stage_images for p in each)]
    # Upper bound of a PNG: the raw RGB bytes, one filter byte per row, zlib's worst-case
    # overhead (5 bytes per 16 KiB block) and the metadata (a few KiB).
    png_bytes = lambda h, w: 3 * h * w + h + (3 * h * w) // 16384 * 5 + 65536  # noqa: E731
    bytes_each = [png_bytes(*final)] * len(images) + [png_bytes(*sizes[k]) for each in stage_images for k in range(len(each))]
    # Checked on every rank (the same verdict, so that all stop together); under --parallel only
    # rank 0 writes them.
    check_output_paths(paths, overwrite=args.overwrite, field="--output", bytes_each=bytes_each)
    writes = is_main_process()

    # 4. The run; its files are moved into place only when all of them are written.
    from .pipeline import HiFlowPipeline

    dtype = getattr(torch, args.dtype)
    try:
        if spec is not None:
            from .parallel import init_distributed

            device = init_distributed(spec, device, timeout_s=args.parallel_timeout)
        pipe = HiFlowPipeline.from_pretrained(model_dir, torch_dtype=dtype, device=device, memory_budget=args.memory_budget)
        if spec is not None:
            pipe.enable_parallelism(spec)
        with OutputSet(overwrite=args.overwrite) as outputs:
            out = pipe(
                prompt,
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                config=config,
                seed=seed,
                output_type="pil",
                return_stage_images=args.save_stages,
                backend=args.backend,
                attention=args.attention,
                compile=args.compile,
                progress=not args.quiet,
                memory_budget=args.memory_budget,  # hiflow_fast.memory_cli adds --memory-budget and --lossy
                lossy=args.lossy,
            )
            metadata = {
                "generator": "hiflow_fast",
                "hiflow_fast_version": __version__,
                "torch_version": torch.__version__,
                "diffusers_version": _version_of("diffusers"),
                "model": os.path.abspath(model_dir) if args.model else "embedded tiny random Flux",
                "prompt": prompt,
                "prompt_embeds": args.prompt_embeds,
                "seed": out.seed,
                "device": str(device),
                "dtype": args.dtype,
                "backend": backend,
                "attention": attention,
                "compile": args.compile,
                "parallel": str(spec) if spec is not None else None,
                "sharpening_sigma": config.sharpening_sigma if isinstance(config.sharpening_sigma, (str, float)) else list(config.sharpening_sigma),
                "official_compat": config.official_compat,
                "memory_plan": out.memory_plan,  # "lossy-fp8" marks a LOSSY run
                **params,
            }
            path = output
            try:
                for i, path in enumerate(images if writes else []):
                    extra = {"batch_index": i, "batch_size": batch} if batch > 1 else {}
                    for k, path in enumerate(stage_images[i]):
                        outputs.write(path, _png_writer(out.stage_images[k][i], {**metadata, **extra, "stage": k}))
                    path = images[i]
                    outputs.write(path, _png_writer(out.images[i], {**metadata, **extra}))
                written = outputs.commit()
            except OSError as exc:
                # A location that turned unwritable or full during the run: nothing is left.
                raise HiFlowInputError(
                    "--output", path, f"a location that can be written ({exc.strerror or exc}); no file was written"
                ) from None
    except HiFlowInputError as exc:
        raise named(exc) from None
    if not args.quiet and writes:
        first = out.images[0]
        lossy = f", LOSSY memory plan {out.memory_plan}" if args.lossy else ""
        print(f"wrote {', '.join(written)} ({first.height}x{first.width}, seed {out.seed}{lossy})")
    return 0


def _add_generate(sub) -> None:
    from .attention_backends import registered_backends
    from .backend import BACKENDS
    from .config import (
        ALPHA_RANGE, BETA_RANGE, FILTER_RATIO_RANGE, GUIDANCE_RANGE, MAX_PIXELS, MAX_SIDE, MAX_STEPS, NTK_RANGE,
        SHARPENING_SIGMA_MAX, STRUCTURE_GUIDANCE, UPSAMPLING,
    )

    p = sub.add_parser(
        "generate",
        help="generate an image with HiFlow",
        description="Generate an image with HiFlow. Sizes are HEIGHTxWIDTH. A per-stage option takes one "
        "value (used for every stage) or one per --target-sizes entry; an option not given takes the "
        "preset's values, following the number of --target-sizes.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--prompt", help="text prompt (needs a model with text encoders)")
    p.add_argument("--prompt-embeds", metavar="FILE", help="safetensors file with prompt_embeds [B,T,D] and pooled_prompt_embeds [B,P]; B > 1 writes B images (default: the model's bundled prompt_embeds.safetensors)")
    p.add_argument("--model", metavar="DIR", help="diffusers-format Flux folder (default: the embedded tiny random model)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="stage plan defaults (default: tiny for the embedded model, else official)")
    p.add_argument("--size", metavar="HxW", help=f"base size HEIGHTxWIDTH, multiples of 16, each side <= {MAX_SIDE}, area <= {MAX_PIXELS} px (default: the preset's: official 1024x1024, tiny 256x256)")
    p.add_argument("--steps", help=f"base-stage steps, 1 to {MAX_STEPS} (default: the preset's: official 30, tiny 8)")
    p.add_argument("--guidance", help=f"base-stage guidance scale, {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g} (default: 3.5)")
    p.add_argument("--target-sizes", metavar="HxW,...", help="high-res stage sizes, each growing from the previous (default: the preset's: official 2048x2048,4096x4096, tiny 512x512,1024x1024)")
    p.add_argument("--highres-steps", metavar="N,...", help="steps per high-res stage, each at most --steps (default: the preset's: official 16,10, tiny 4,3)")
    p.add_argument("--highres-guidance", metavar="G,...", help=f"guidance per high-res stage, {GUIDANCE_RANGE[0]:g} to {GUIDANCE_RANGE[1]:g} (default: 4.5,6)")
    p.add_argument("--filter-ratio", metavar="R,...", help=f"Butterworth cutoff per high-res stage, {FILTER_RATIO_RANGE[0]:g} to sqrt(2)={FILTER_RATIO_RANGE[1]:.4g} (default: 0.2,0.2)")
    p.add_argument("--alphas", metavar="A,...", help=f"direction-alignment weight per stage, {ALPHA_RANGE[0]:g} to {ALPHA_RANGE[1]:g} (default: 1.0,0.25)")
    p.add_argument("--betas", metavar="B,...", help=f"acceleration-alignment weight per stage, {BETA_RANGE[0]:g} to {BETA_RANGE[1]:g} (default: 0.5,0.5)")
    p.add_argument("--ntk", metavar="F,...", help=f"RoPE NTK factor per stage, {NTK_RANGE[0]:g} to {NTK_RANGE[1]:g} (default: 10,10)")
    p.add_argument("--structure-guidance", choices=STRUCTURE_GUIDANCE, default="fft", help="low-pass of the direction alignment: FFT Butterworth or Haar wavelet")
    p.add_argument("--upsampling", choices=UPSAMPLING, default="latent", help="how a stage's reference is upsampled")
    p.add_argument("--no-swin", action="store_true", help="disable swin patchify (the shifted token grid on even steps)")
    p.add_argument("--no-proportional-attention", action="store_true", help="disable the proportional attention scale of the high-res stages")
    p.add_argument("--text-duplication", action="store_true", help="duplicate the text tokens per image tile (official option)")
    p.add_argument("--sharpening-sigma", default="seeded", help=f"blur sigma of the sharpening, > 0 and <= {SHARPENING_SIGMA_MAX:g}, or 'seeded' (the official draws, from --seed)")
    p.add_argument("--official-compat", action="store_true", help="return the padded size and always use proportional attention, as the official code")
    p.add_argument("--seed", help="random seed, 0 to 2**63-1 (default: a fresh one, stored in the PNG)")
    p.add_argument("--output", default="hiflow.png", metavar="FILE.png", help="output PNG; a batch of B writes FILE_0.png ... FILE_{B-1}.png; never overwritten without --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--save-stages", action="store_true", help="also write FILE_stageK.png for every stage K (0 = base; FILE_I_stageK.png in a batch)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (a device that exists here)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations dtype")
    p.add_argument("--backend", choices=BACKENDS, help="kernel backend of the guidance step and q/k norm + RoPE (default: $HIFLOW_BACKEND, else auto: triton on a GPU, ref on a CPU; native only when asked for, see README)")
    p.add_argument("--attention", choices=registered_backends(), help="attention backend (default: $HIFLOW_ATTENTION, else sdpa); some need a GPU or a package")
    p.add_argument("--compile", action="store_true", help="torch.compile the transformer (+ CUDA graphs on a GPU)")
    p.add_argument("--parallel", metavar="SPEC", help="context parallelism under torchrun: ulysses=N, ring=N or ulysses=N,ring=M (product = processes); see README 'Multi-GPU'")
    p.add_argument("--parallel-timeout", default="600", metavar="SECONDS", help="with --parallel: a collective waiting longer than this ends the run on every rank")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no summary line")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    p.set_defaults(run=_generate)


# Options of `generate` that take a value (for join_negative_values).
def _value_flags(parser: argparse.ArgumentParser) -> set[str]:
    flags: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= _value_flags(sub)
        elif action.option_strings and action.nargs != 0:
            flags.update(action.option_strings)
    return flags


def available_benchmarks() -> list[str]:
    folder = importlib.resources.files("hiflow_fast.bench")
    return sorted(p.name[len("bench_"):-3] for p in folder.iterdir() if p.name.startswith("bench_") and p.name.endswith(".py"))


def _bench(argv: list[str]) -> int:
    """`hiflow-fast bench [NAME] [options]`: NAME defaults to all, and every option goes to
    the benchmark (so `hiflow-fast bench --device cpu` runs the suite on the CPU)."""
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: hiflow-fast bench [NAME] [options]\n\n"
            f"Run a benchmark. NAME: {', '.join(available_benchmarks())} (default: all).\n"
            "`hiflow-fast bench NAME --help` lists the options of a benchmark, e.g.\n"
            "`hiflow-fast bench --device cpu` runs the suite at reduced sizes on the CPU."
        )
        return 0
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
    else:
        name, rest = "all", argv
    try:
        module = importlib.import_module(f"hiflow_fast.bench.bench_{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"hiflow_fast.bench.bench_{name}":
            raise
        raise HiFlowInputError("bench", name, f"one of the benchmarks: {', '.join(available_benchmarks())}") from None
    return int(module.main(list(rest)) or 0)


def build_parser() -> Parser:
    parser = Parser(prog="hiflow-fast", description="Fast, faithful HiFlow for Flux.", formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"hiflow-fast {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,plan,bench}")
    _add_generate(sub)
    add_memory_arguments(sub)  # `plan`, and generate --memory-budget (hiflow_fast.memory_cli)
    sub.add_parser("bench", help="run the benchmarks: bench [NAME] [options] (NAME default: all; bench --help)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = next((i for i, token in enumerate(argv) if not token.startswith("-")), len(argv))
    debug = "--debug" in argv[:command_at] or (argv[command_at:command_at + 1] != ["bench"] and "--debug" in argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[command_at:command_at + 1] == ["bench"]:
            return _bench(argv[command_at + 1:])
        parser = build_parser()
        argv = join_negative_values(argv, _value_flags(parser))
        args = parser.parse_args(argv)
        return args.run(args, _typed(_value_flags(parser), argv))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted; no output file was written", file=sys.stderr)
        return 130
    except (HiFlowInputError, HiFlowModelError, NonFiniteLatentsError, StageOutOfMemoryError, ParallelDivergenceError) as exc:
        if debug:
            raise
        # Under torchrun every rank checks the same arguments, and all ranks raise a divergence
        # together: one copy (rank 0's) of either is enough.
        if is_main_process() or not isinstance(exc, (HiFlowInputError, ParallelDivergenceError)):
            print(f"error: {_rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        detail = (str(exc).strip().splitlines() or [""])[0]
        print(f"error: {_rank_prefix()}{type(exc).__name__}: {detail} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
