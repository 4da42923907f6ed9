"""Run under torchrun by tests/test_parallel.py: HiFlow with context parallelism against the
single-process pipeline, on the CPU (gloo).

    torchrun --nproc-per-node N tests/parallel_worker.py --model DIR --specs "ulysses=2;ring=2" --out FILE.json

Every rank runs each spec on a square and a non-square plan (swin patchify on); then rank 0
runs the same plans in one process and writes, per spec and plan, the relative L2 of the final
latents against it, whether every rank returned the same latents, and whether the transformer
was left as it was found."""

import argparse
import json
import os

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from hiflow_fast.config import HiFlowConfig, HiResStage
from hiflow_fast.errors import HiFlowInputError, ParallelDivergenceError
from hiflow_fast.parallel import ParallelRun, ParallelSpec, check_process_group, check_replicated, init_distributed
from hiflow_fast.vae import vae_tiling
from hiflow_fast.pipeline import HiFlowPipeline

PLANS = {
    # Base grids 16x16 / 16x24 latents; the swin-padded steps give odd token counts
    # (e.g. 17 x 25 = 425 image tokens), which split unevenly over every world size tested.
    "square": HiFlowConfig(height=128, width=128, num_inference_steps=4, stages=(HiResStage(256, 256, steps=3),)),
    "non-square": HiFlowConfig(
        height=128, width=192, num_inference_steps=4, stages=(HiResStage(192, 320, steps=3), HiResStage(256, 384, steps=2))
    ),
}


def module_state(transformer) -> list:
    """What a call may change on the user's transformer, per module: its instance attributes,
    the identity of an instance `forward`, torch's forward (pre-)hooks and diffusers' hook
    names; then every attention processor by identity."""
    state = []
    for m in transformer.modules():
        registry = vars(m).get("_diffusers_hook")
        state.append((
            sorted(vars(m)),
            id(vars(m).get("forward")),
            len(m._forward_pre_hooks), len(m._forward_hooks),
            None if registry is None else list(registry.hooks),
        ))
    return state + [id(p) for p in transformer.attn_processors.values()]


# Small VAE tiles, so that every stage entry and the final decode are tiled (and the tiles split
# across ranks): 64 px / 8 latent pixels, where the embedded VAE's default is 1024 / 128.
VAE_TILE_PX = 64


def with_quant_convs(vae):
    """The same VAE with the 1x1 quant / post-quant convolutions some VAEs have (FLUX's has
    none), weights drawn from a private generator."""
    from diffusers import AutoencoderKL

    variant = AutoencoderKL.from_config({**vae.config, "use_quant_conv": True, "use_post_quant_conv": True})
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for parameter in variant.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    variant.tile_sample_min_size, variant.tile_latent_min_size = vae.tile_sample_min_size, vae.tile_latent_min_size
    return variant


def vae_split_is_exact(spec: ParallelSpec, vae) -> dict:
    """Tiled decode and encode with the tiles split across ranks equal the one-rank ones, bit for
    bit (odd sizes: edge tiles of every shape), for the model's VAE and one with quant convs."""
    generator = torch.Generator().manual_seed(5)
    z = torch.randn(1, vae.config.latent_channels, 21, 27, generator=generator)
    image = torch.rand(1, 3, 168, 216, generator=generator) * 2 - 1
    run = ParallelRun(spec)
    run.setup(torch.device("cpu"))
    exact = {"vae_decode_exact": True, "vae_encode_exact": True}
    for each in (vae, with_quant_convs(vae)):
        with torch.no_grad(), vae_tiling(each, True):
            decoded, encoded = each.decode(z).sample, each.encode(image).latent_dist.mode()
            with run.split_vae_tiles(each):
                split_decoded, split_encoded = each.decode(z).sample, each.encode(image).latent_dist.mode()
        exact["vae_decode_exact"] &= torch.equal(decoded, split_decoded)
        exact["vae_encode_exact"] &= torch.equal(encoded, split_encoded)
    return exact


def collective_checks(spec: ParallelSpec, rank: int) -> dict:
    """The replication check and the backend check, on this gloo group."""
    nan = torch.tensor([1.0, float("nan"), 2.0])
    try:
        check_replicated(nan, "a NaN on every rank")
        nan_is_replicated = True
    except ParallelDivergenceError:
        nan_is_replicated = False
    try:
        check_replicated(torch.tensor([1.0, 2.0 + (rank == 1)]), "a value only rank 1 has")
        divergence_raised = False
    except ParallelDivergenceError:
        divergence_raised = True  # on every rank: the flag is all-reduced
    raised = torch.tensor([float(divergence_raised)])
    dist.all_reduce(raised, op=dist.ReduceOp.MIN)
    try:
        check_process_group(spec, "cuda")
        cuda_on_gloo_refused = False
    except HiFlowInputError:
        cuda_on_gloo_refused = True
    return {
        "nan_is_replicated": nan_is_replicated,
        "divergence_raised_on_every_rank": bool(raised.item()),
        "cuda_on_gloo_refused": cuda_on_gloo_refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--specs", required=True)
    parser.add_argument("--attention", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fail-rank", type=int, default=None, help="this rank raises before its first run (the others go on)")
    args = parser.parse_args()
    specs = args.specs.split(";")
    init_distributed(ParallelSpec.parse(specs[0]), "cpu", timeout_s=120)
    rank = dist.get_rank()
    pipe = HiFlowPipeline.from_pretrained(args.model, load_text_encoders=False)
    pipe.vae.tile_sample_min_size = VAE_TILE_PX
    pipe.vae.tile_latent_min_size = VAE_TILE_PX // 8
    embeds = load_file(os.path.join(args.model, "prompt_embeds.safetensors"))

    def run(config):
        return pipe(
            prompt_embeds=embeds["prompt_embeds"], pooled_prompt_embeds=embeds["pooled_prompt_embeds"], config=config,
            seed=11, output_type="latent", progress=False, attention=args.attention,
        ).latents

    before = module_state(pipe.transformer)
    results = {}
    if rank == args.fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    for spec in specs:
        pipe.enable_parallelism(spec)
        for name, config in PLANS.items():
            latents = run(config)
            gathered = [torch.empty_like(latents) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, latents.contiguous())
            results[f"{spec} {name}"] = {
                "latents": latents,
                "replicated": all(torch.equal(g, latents) for g in gathered),
            }
    restored = module_state(pipe.transformer) == before
    pipe.disable_parallelism()
    checks = collective_checks(ParallelSpec.parse(specs[0]), rank) | vae_split_is_exact(ParallelSpec.parse(specs[0]), pipe.vae)
    if rank == 0:
        report = {"state_restored": restored, "checks": checks, "runs": {}}
        single = {name: run(config) for name, config in PLANS.items()}
        for key, entry in results.items():
            reference = single[key.split(" ", 1)[1]]
            error = ((entry["latents"].double() - reference.double()).norm() / reference.double().norm()).item()
            report["runs"][key] = {"rel_l2": error, "replicated": entry["replicated"]}
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
