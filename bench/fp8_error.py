"""The error of the LOSSY fp8 plans, measured through the mechanism the pipeline applies
(`hiflow_fast.lossy_weights.Fp8BlockWeights`: diffusers' layerwise casting of the transformer
blocks' layers to float8_e4m3fn, the layers named *norm* -- adaLN, RMSNorm -- and everything
outside the blocks kept at full precision), against the same weights unchanged.

    python -m hiflow_fast.bench.fp8_error [--double 2 --single 4 --image-tokens 64] [--json OUT]

Why layerwise casting: it is diffusers' own (no extra dependency), runs on a CPU, is per
instance, and halves the bytes a block occupies or streams; torchao's float8 weight-only
kernels would need torchao and a GPU with fp8 matmuls. Measured:

1. one forward at FLUX.1-dev width (hidden 3072, 24 heads, 512 text tokens, FLUX.1-dev's
   embedders) with random weights (N(0, 1/fan_in), bench/flux_shapes.init_random_), in bf16,
   for a stack of `double` + `single` blocks (the 57-block model does not fit a small CPU box:
   23.8 GB of bf16 weights), relative L2 of the output after each prefix of the stack;
2. the tiny embedded model's final latents of a small HiFlow cascade through the pipeline
   (`pipe(..., memory_budget=..., lossy="fp8")` against the exact call; fp32 compute).
"""

from __future__ import annotations

import json

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def flux_width_forward_error(double: int = 2, single: int = 4, image_tokens: int = 64) -> dict:
    """Relative L2 of the fp8 model's output at FLUX.1-dev width against bf16, for the first
    1..double double blocks, then those plus 1..single single blocks (one model, its block lists
    cut short for each prefix, so every prefix runs the same weights)."""
    from hiflow_fast.bench import flux_shapes as fs
    from hiflow_fast.bench.bench_transformer import FLUX, build_model, model_inputs
    from hiflow_fast.lossy_weights import Fp8BlockWeights

    model = build_model("cpu", torch.bfloat16, FLUX, double=double, single=single)
    fs.init_random_(model, seed=0)
    inputs = model_inputs(model, image_tokens, FLUX["text"], "cpu", torch.bfloat16)
    doubles, singles = list(model.transformer_blocks), list(model.single_transformer_blocks)
    prefixes = [(d, 0) for d in range(1, double + 1)] + [(double, s) for s in range(1, single + 1)]

    def outputs():
        out = []
        for d, s in prefixes:
            model.transformer_blocks = torch.nn.ModuleList(doubles[:d])
            model.single_transformer_blocks = torch.nn.ModuleList(singles[:s])
            out.append(model(**inputs, return_dict=False)[0])
        model.transformer_blocks, model.single_transformer_blocks = torch.nn.ModuleList(doubles), torch.nn.ModuleList(singles)
        return out

    with torch.no_grad():
        reference = outputs()
        with Fp8BlockWeights(model, torch.bfloat16):
            lossy = outputs()
    return {f"{d}+{s}": rel_l2(a, b) for (d, s), a, b in zip(prefixes, lossy, reference)}


def tiny_latents_error() -> float:
    from safetensors.torch import load_file

    from hiflow_fast import HiFlowConfig, HiFlowPipeline, HiResStage
    from hiflow_fast.cli import embedded_model_dir

    root = embedded_model_dir()
    tensors = load_file(f"{root}/prompt_embeds.safetensors")
    config = HiFlowConfig(height=128, width=128, num_inference_steps=4,
                          stages=(HiResStage(192, 256, 2, ntk_factor=4.0), HiResStage(256, 320, 3, alpha=0.25)))

    def run(pipe, **kwargs):
        return pipe(prompt_embeds=tensors["prompt_embeds"], pooled_prompt_embeds=tensors["pooled_prompt_embeds"],
                    config=config, seed=5, output_type="latent", progress=False, **kwargs).latents

    pipe = HiFlowPipeline.from_pretrained(root, load_text_encoders=False)
    reference = run(pipe)
    return rel_l2(run(pipe, memory_budget="64GiB", lossy="fp8"), reference)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hiflow_fast.bench.fp8_error", description=__doc__.split("\n")[0])
    parser.add_argument("--double", type=int, default=2, help="double blocks at FLUX.1-dev width (0.68 GB bf16 each)")
    parser.add_argument("--single", type=int, default=4, help="single blocks at FLUX.1-dev width (0.28 GB bf16 each)")
    parser.add_argument("--image-tokens", type=int, default=64, help="image tokens of the forward (text: 512)")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = {
        "flux_width_forward_rel_l2_by_blocks": flux_width_forward_error(args.double, args.single, args.image_tokens),
        "tiny_final_latents_rel_l2": tiny_latents_error(),
        "method": "hiflow_fast.lossy_weights.Fp8BlockWeights (diffusers layerwise casting of the blocks' non-norm layers, "
                  "float8_e4m3fn -> bf16 / fp32), random weights, CPU",
        "image_tokens": args.image_tokens,
        "text_tokens": 512,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        from hiflow_fast.io import atomic_write

        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")

        atomic_write(args.json, write, overwrite=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
