"""The error of the LOSSY fp8 plans: weights stored in float8_e4m3fn and upcast layer by layer
(diffusers' `enable_layerwise_casting`), against the same weights in bf16 / fp32.

    python -m hiflow_fast.bench.fp8_error

Why layerwise casting: it is diffusers' own (no extra dependency), runs on a CPU, is per
instance, and halves the bytes a block occupies or streams; torchao's float8 weight-only
kernels would need torchao and a GPU with fp8 matmuls. Its error:

1. one forward at FLUX.1-dev width (hidden 3072, 512 text tokens) with random weights, a few
   blocks (a CPU runs the 57-block model too slowly), relative L2 of the output;
2. the tiny embedded model's final latents of a small HiFlow cascade (fp32 compute).
"""

from __future__ import annotations

import json

import torch


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def flux_width_forward_error(double: int = 1, single: int = 1, image_tokens: int = 64) -> float:
    from hiflow_fast.bench import flux_shapes as fs
    from hiflow_fast.bench.bench_transformer import FLUX, build_model, model_inputs

    model = build_model("cpu", torch.bfloat16, FLUX, double=double, single=single)
    fs.init_random_(model, seed=0)
    inputs = model_inputs(model, image_tokens, FLUX["text"], "cpu", torch.bfloat16)
    with torch.no_grad():
        reference = model(**inputs, return_dict=False)[0]
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
        lossy = model(**inputs, return_dict=False)[0]
    return rel_l2(lossy, reference)


def tiny_latents_error() -> float:
    from safetensors.torch import load_file

    from hiflow_fast import HiFlowConfig, HiFlowPipeline, HiResStage
    from hiflow_fast.cli import embedded_model_dir

    root = embedded_model_dir()
    tensors = load_file(f"{root}/prompt_embeds.safetensors")
    config = HiFlowConfig(height=128, width=128, num_inference_steps=4,
                          stages=(HiResStage(192, 256, 2, ntk_factor=4.0), HiResStage(256, 320, 3, alpha=0.25)))

    def run(pipe):
        return pipe(prompt_embeds=tensors["prompt_embeds"], pooled_prompt_embeds=tensors["pooled_prompt_embeds"],
                    config=config, seed=5, output_type="latent", progress=False).latents

    pipe = HiFlowPipeline.from_pretrained(root, load_text_encoders=False)
    reference = run(pipe)
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    return rel_l2(run(pipe), reference)


def main() -> int:
    result = {"flux_width_forward_rel_l2": flux_width_forward_error(), "tiny_final_latents_rel_l2": tiny_latents_error(),
              "method": "diffusers enable_layerwise_casting(float8_e4m3fn -> bf16/fp32), random weights, CPU"}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
