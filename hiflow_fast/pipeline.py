"""The HiFlow pipeline on diffusers' Flux components.

A base stage samples at the base size; each high-resolution stage then starts from the
previous stage's image (initialization alignment) and runs the last `steps` timesteps of the
base schedule, guided by the previous stage's clean estimates (direction and acceleration
alignment, `hiflow_fast.guidance`).

Nothing is changed on the user's components beyond the duration of a call: the transformer's
pos_embed and attention processors and the VAE's tiling flag are restored afterwards, the
scheduler is only ever deep-copied, and no global RNG is read or written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from tqdm.auto import tqdm

from . import latents as L
from . import vae as V
from .attention_backends import resolve_backend_name
from .backend import resolve_backend
from .checks import check_device, check_dtype, check_index_range, check_model_dir, check_prompt_embeds
from .config import HiFlowConfig, as_int
from .errors import HiFlowInputError, HiFlowModelError, NonFiniteLatentsError, StageOutOfMemoryError, is_out_of_memory
from .guidance import VelocityState, guidance_step
from .ref.attention import duplicate_text
from .ref.reference_flow import renoise
from .schedule import Schedule, base_schedule
from .fast_transformer import fast_transformer
from .host_placement import place_host_resident
from .memory_plan import parse_budget, plan_for_call
from . import parallel as P

logger = logging.getLogger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# A sanity bound on images per call; the 32-bit index bound (checks.check_index_range) is
# usually the tighter one at high resolutions.
MAX_IMAGES_PER_PROMPT = 64


@dataclass
class StageStart:
    """Reported when a high-res stage has built its starting latents."""

    stage: int  # 1-based high-res stage number (0 is the base stage)
    guidance_latents: torch.Tensor  # packed, at the stage's target size
    noised_latents: torch.Tensor  # sigma * noise + (1 - sigma) * guidance_latents
    sigma: float


@dataclass
class StepEnd:
    """Reported after every denoising step."""

    stage: int
    i: int  # step within the stage
    timestep_index: int  # index into the base schedule
    hw: tuple[int, int]  # latent grid of `latents` (swin-padded on even high-res steps)
    latents: torch.Tensor  # x_{t-1}, packed
    pred_x0: torch.Tensor  # the unguided clean estimate, packed


@dataclass
class HiFlowOutput:
    images: Any  # list of PIL images, np.ndarray [B, H, W, 3], torch.Tensor [B, 3, H, W] or None
    latents: torch.Tensor  # final packed latents, *uncropped* (on the swin-padded grid if it ended there)
    latent_hw: tuple[int, int]
    seed: int | None
    stage_images: list[Any] = field(default_factory=list)  # one entry per stage, same type as `images`
    memory_plan: str | None = None  # the memory plan's name ("exact-bfloat16", "lossy-fp8"); None: no plan


class _SharpeningSigmas:
    """The blur sigmas of a generation, in the official draw order."""

    def __init__(self, config: HiFlowConfig, seed: int | None):
        spec = config.sharpening_sigma
        self._values: Sequence[float] | None = None
        self._constant: float | None = None
        self._generator: torch.Generator | None = None
        if isinstance(spec, str):  # "seeded"
            if seed is None:
                raise HiFlowInputError(
                    "sharpening_sigma", spec, "a number or a sequence when no seed is known (pass seed=)"
                )
            # The official code draws U(lo, hi) from the global RNG right after
            # torch.manual_seed(seed); a private CPU generator with that seed gives the same draws.
            self._generator = torch.Generator(device="cpu").manual_seed(seed)
        elif isinstance(spec, (int, float)):
            self._constant = float(spec)
        else:
            self._values = tuple(spec)
        self._low, self._high = config.sharpening_sigma_range
        self._count = 0

    def next(self) -> float:
        index = self._count
        self._count += 1
        if self._constant is not None:
            return self._constant
        if self._values is not None:
            return float(self._values[index])
        return torch.empty(1).uniform_(self._low, self._high, generator=self._generator).item()


def _nonfinite_flag(x: torch.Tensor) -> torch.Tensor:
    """A 0-d device bool: whether `x` holds NaN/Inf. Kept on the device (no host sync per step);
    `_check_steps_finite` reads a stage's flags once, at its end."""
    return torch.logical_not(torch.isfinite(x).all())


def _check_steps_finite(flags: list[torch.Tensor], stage_name: str) -> None:
    """NonFiniteLatentsError naming the stage and its first step whose latents hold NaN/Inf."""
    if not flags:
        return
    bad = torch.stack(flags).nonzero()
    if bad.numel():
        step = int(bad[0, 0])
        raise NonFiniteLatentsError(f"after step {step + 1} of {len(flags)} of {stage_name}")


def _unique_seed() -> int:
    # Not torch.seed(): that would re-seed the global RNG.
    return secrets.randbits(63)


class HiFlowPipeline:
    """HiFlow on a diffusers Flux transformer, VAE and flow-matching scheduler."""

    def __init__(self, transformer, vae, scheduler, *, flux_pipeline=None, parallel=None):
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.flux_pipeline = flux_pipeline  # for prompt encoding and offloading, when wrapped
        self.placement = None  # hiflow_fast.host_placement: set when loaded with a memory budget
        self.image_processor = VaeImageProcessor(vae_scale_factor=2 * L.VAE_DOWNSAMPLE)
        self._parallel: P.ParallelRun | None = None
        if parallel is not None:
            self.enable_parallelism(parallel)

    # -- context parallelism --------------------------------------------------------------------
    def enable_parallelism(self, parallel) -> None:
        """Split every transformer call by sequence over the default process group (launch
        with torchrun; hiflow_fast.parallel.init_distributed joins it): "ulysses=N", "ring=N",
        "ulysses=N,ring=M", a ParallelSpec or a diffusers ContextParallelConfig. Checked now
        (heads, world size); applied per call and removed afterwards. Latents stay replicated:
        every rank returns the same output."""
        spec = P.as_parallel_spec(parallel, "parallel")
        if spec is None:
            raise HiFlowInputError("parallel", None, "a parallel spec (use disable_parallelism() to turn it off)")
        P.check_transformer(spec, self.transformer)
        P.check_process_group(spec, self.device)
        self._parallel = P.ParallelRun(spec)

    def disable_parallelism(self) -> None:
        self._parallel = None

    @property
    def parallel(self) -> "P.ParallelSpec | None":
        return None if self._parallel is None else self._parallel.spec

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        load_text_encoders: bool = True,
        memory_budget: str | int | float | None = None,
    ) -> "HiFlowPipeline":
        """Load a diffusers-format Flux folder (transformer/, vae/, scheduler/; text encoders
        and tokenizers optional). Only local files are read (safetensors; pickled weights are
        refused). The device, the dtype (a torch.dtype or its name) and the folder's files are
        checked before any weights are read.

        memory_budget: load for a device of this size ("12GiB", "auto", ...): the weights are
        read into host memory and only the transformer outside its blocks and the VAE go to
        `device`; the blocks stay in host memory (pinned on CUDA) and each call's plan puts the
        resident ones on the device and streams the rest (hiflow_fast.host_placement). Calls
        then run under this budget unless they give their own."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

        device = check_device(device, "device")
        torch_dtype = check_dtype(torch_dtype, "torch_dtype")
        if not isinstance(load_text_encoders, bool):
            raise HiFlowInputError("load_text_encoders", load_text_encoders, "True or False")
        root = os.fspath(model_dir) if isinstance(model_dir, (str, os.PathLike)) else model_dir
        check_model_dir(root, "model_dir")
        budget_bytes = parse_budget(memory_budget) if memory_budget is not None else None
        try:
            transformer = FluxTransformer2DModel.from_pretrained(
                root, subfolder="transformer", torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True
            )
            vae = AutoencoderKL.from_pretrained(
                root, subfolder="vae", torch_dtype=torch_dtype, local_files_only=True, use_safetensors=True
            )
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
        except Exception as exc:  # diffusers raises several types for missing/corrupt files
            raise HiFlowModelError(f"could not load the Flux model in {root!r}: {exc}") from exc
        if budget_bytes is None:
            transformer.to(device)
            vae.to(device)
        flux_pipeline = None
        if load_text_encoders and all(
            os.path.isdir(os.path.join(root, sub)) for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        ):
            try:
                from diffusers import FluxPipeline
            except ImportError as exc:  # transformers is an optional dependency
                raise HiFlowModelError(
                    f"{root!r} has text encoders but `transformers` is not installed: pip install 'hiflow-fast[text]'"
                ) from exc
            flux_pipeline = FluxPipeline.from_pretrained(
                root, transformer=transformer, vae=vae, scheduler=scheduler, torch_dtype=torch_dtype, local_files_only=True
            )
            if budget_bytes is None:
                flux_pipeline.to(device)
        pipe = cls(transformer, vae, scheduler, flux_pipeline=flux_pipeline)
        if budget_bytes is not None:
            pipe.placement = place_host_resident(pipe, device, memory_budget, budget_bytes)
        return pipe

    @classmethod
    def from_flux_pipeline(cls, pipe) -> "HiFlowPipeline":
        """Wrap an existing diffusers FluxPipeline (LoRAs, offloading and all). Its components are
        used as they are; every change HiFlow makes to them is undone after each call."""
        for name in ("transformer", "vae", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise HiFlowInputError("pipe", type(pipe).__name__, f"a Flux pipeline with a {name}")
        return cls(pipe.transformer, pipe.vae, pipe.scheduler, flux_pipeline=pipe)

    # -- helpers ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        if self.placement is not None:
            return self.placement.device
        if self.flux_pipeline is not None:
            return self.flux_pipeline._execution_device
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def latent_channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def _encode_prompt(self, prompt, prompt_embeds, pooled_prompt_embeds, num_images_per_prompt, max_sequence_length,
                       encode_device=None):
        device, dtype = self.device, self.dtype
        if prompt is not None and prompt_embeds is not None:
            raise HiFlowInputError("prompt", prompt, "either a prompt or prompt_embeds, not both")
        if prompt is None:
            # Checked by _check_call_arguments.
            embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
            pooled = pooled_prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
            return embeds, pooled
        if self.flux_pipeline is None or getattr(self.flux_pipeline, "text_encoder", None) is None:
            raise HiFlowInputError(
                "prompt", prompt, "prompt_embeds instead: this model was loaded without text encoders"
            )
        embeds, pooled, _ = self.flux_pipeline.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            device=encode_device or device,
            num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length,
        )
        return embeds.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)

    def _postprocess(self, image: torch.Tensor, output_type: str):
        return self.image_processor.postprocess(image.float(), output_type=output_type)

    def _check_call_arguments(
        self, prompt, config, prompt_embeds, pooled_prompt_embeds, seed, generator, num_images_per_prompt, latents,
        stage_noises, output_type, return_stage_images, backend, attention, compile, callback, progress,
    ) -> HiFlowConfig:
        """Every check that needs no denoising step, made before the first one; returns the
        config to use."""
        if config is None:
            config = HiFlowConfig()
        elif not isinstance(config, HiFlowConfig):
            raise HiFlowInputError(
                "config",
                type(config).__name__,
                "a HiFlowConfig (from a dict: HiFlowConfig(**d), or HiFlowConfig.from_official_kwargs(d))",
            )
        if not isinstance(output_type, str) or output_type not in OUTPUT_TYPES:
            raise HiFlowInputError("output_type", output_type, f"one of {', '.join(map(repr, OUTPUT_TYPES))}")
        count = as_int(num_images_per_prompt)
        if count is None or not 1 <= count <= MAX_IMAGES_PER_PROMPT:
            raise HiFlowInputError("num_images_per_prompt", num_images_per_prompt, f"an integer from 1 to {MAX_IMAGES_PER_PROMPT}")
        if seed is not None:
            value = as_int(seed)
            if value is None or not 0 <= value < 2**63:
                raise HiFlowInputError("seed", seed, "an integer from 0 to 2**63 - 1")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise HiFlowInputError("generator", type(generator).__name__, "a torch.Generator or None")
            if seed is not None:
                raise HiFlowInputError(
                    "generator", generator, "None when seed is given: pass either seed or generator (its initial seed is reported)"
                )
        for name, value in (("return_stage_images", return_stage_images), ("compile", compile), ("progress", progress)):
            if not isinstance(value, (bool, np.bool_)):
                raise HiFlowInputError(name, value, "True or False")
        if callback is not None and not callable(callback):
            raise HiFlowInputError("callback", callback, "a function taking a StageStart or StepEnd, or None")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise HiFlowInputError("latents", type(latents).__name__, "a torch.Tensor [B, C, h, w] or None")
        if stage_noises is not None:
            if isinstance(stage_noises, torch.Tensor) or not isinstance(stage_noises, (list, tuple)):
                raise HiFlowInputError("stage_noises", type(stage_noises).__name__, "a list of torch.Tensor, one per high-res stage")
            if len(stage_noises) != len(config.stages) or not all(isinstance(t, torch.Tensor) for t in stage_noises):
                raise HiFlowInputError(
                    "stage_noises", f"{len(stage_noises)} items", f"one torch.Tensor per high-res stage ({len(config.stages)})"
                )
        # Prompt / embeddings.
        if prompt is not None:
            if prompt_embeds is not None or pooled_prompt_embeds is not None:
                raise HiFlowInputError("prompt", prompt, "either a prompt or prompt_embeds + pooled_prompt_embeds, not both")
            if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))):
                raise HiFlowInputError("prompt", prompt, "a string or a non-empty list of strings")
            prompts = 1 if isinstance(prompt, str) else len(prompt)
        else:
            if prompt_embeds is None and pooled_prompt_embeds is None:
                raise HiFlowInputError("prompt", None, "a prompt, or prompt_embeds together with pooled_prompt_embeds")
            cfg = self.transformer.config
            check_prompt_embeds(
                prompt_embeds,
                pooled_prompt_embeds,
                joint_attention_dim=cfg.joint_attention_dim,
                pooled_projection_dim=cfg.pooled_projection_dim,
                max_sequence_length=config.max_sequence_length,
            )
            prompts = prompt_embeds.shape[0]
        batch = prompts * count
        base_hw = L.latent_hw(config.height, config.width)
        if latents is not None:
            shape = (batch, self.latent_channels, *base_hw)
            if tuple(latents.shape) != shape:
                raise HiFlowInputError("latents", tuple(latents.shape), f"unpacked base noise of shape {list(shape)}")
        if stage_noises is not None:
            for k, (stage, noise) in enumerate(zip(config.stages, stage_noises)):
                h, w = L.latent_hw(stage.height, stage.width)
                packed = (batch, (h // 2) * (w // 2), 4 * self.latent_channels)
                if tuple(noise.shape) != packed:
                    raise HiFlowInputError(f"stage_noises[{k}]", tuple(noise.shape), f"packed shape {list(packed)}")
        # The largest stage bounds the batch: its hidden state must stay 32-bit addressable.
        last = config.stages[-1] if config.stages else config
        hw = L.latent_hw(last.height, last.width)
        padded = 2 if config.swin_patchify and config.stages else 0
        tokens = ((hw[0] + padded) // 2) * ((hw[1] + padded) // 2) + config.max_sequence_length
        cfg = self.transformer.config
        check_index_range(
            "num_images_per_prompt", batch, tokens, cfg.num_attention_heads * cfg.attention_head_dim,
            f"{last.height}x{last.width}",
        )
        # Backends: resolved here so that an unknown or unavailable one is refused before any step.
        resolve_backend(backend, device=self.device, field="backend")
        attention_name = resolve_backend_name(attention)
        if self._parallel is not None:
            spec = self._parallel.spec
            P.check_process_group(spec, self.device)
            P.check_backend(spec, attention_name)
            if compile:
                raise HiFlowInputError("compile", compile, f"False with parallel={str(spec)!r} (CUDA graphs are not captured across ranks)")
        return config

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        config: HiFlowConfig | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        stage_noises: Sequence[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_stage_images: bool = False,
        backend: str | None = None,
        attention: str | None = None,
        compile: bool = False,
        callback: Callable[[StageStart | StepEnd], None] | None = None,
        progress: bool = True,
        memory_budget: str | int | None = None,
        lossy: str | None = None,
    ) -> HiFlowOutput:
        """Generate with HiFlow.

        Args:
            prompt / prompt_embeds + pooled_prompt_embeds: the text condition (a prompt needs
                text encoders).
            config: the stage plan and every HiFlow setting (default: the official 1K->2K->4K).
            seed: seeds a private CPU generator for all noise and the "seeded" sharpening
                sigmas; same seed and settings, same output. `generator` may be given instead,
                not together (its initial seed then seeds the sharpening draws and is reported).
            latents: the base noise, unpacked [B, C, h, w] (drawn from the generator if None).
            stage_noises: the re-noising noise of each high-res stage, packed [B, N, 4C].
            output_type: "pil", "np", "pt" or "latent" (no decode; `images` is None).
            return_stage_images: also decode and return every stage's result.
            backend: kernel backend of the guidance step and the fused q/k norm + RoPE ("ref",
                "triton", "native"; default: $HIFLOW_BACKEND or automatic: Triton on a GPU).
            attention: attention backend for the high-res stages (default: $HIFLOW_ATTENTION or sdpa).
            compile: torch.compile the transformer (fullgraph) and, on CUDA, capture one CUDA
                graph per stage and swin shape. Same latents as eager, after a warm-up.
            callback: called with a StageStart or StepEnd after each stage entry and step.
            progress: show one progress bar per stage.
            memory_budget: run within this much device memory ("12GiB", "12GB", "12" = GiB, or
                "auto": the free CUDA memory): blocks that do not fit are streamed from host
                memory (hiflow_fast.memory_plan; same latents as without). None: the budget
                the pipeline was loaded with, if any, else no plan.
            lossy: None (exact), or "fp8": LOSSY, the blocks' weights stored in float8 for this
                call (diffusers' layerwise casting; a different image, named in the log and in
                `HiFlowOutput.memory_plan`). Needs a memory budget; undone after the call.

        Every argument is checked before the first step (HiFlowInputError naming it; see
        README "Errors"). NaN/Inf in the latents raises NonFiniteLatentsError naming the stage
        and step; running out of memory, StageOutOfMemoryError naming the stage.
        """
        config = self._check_call_arguments(
            prompt, config, prompt_embeds, pooled_prompt_embeds, seed, generator, num_images_per_prompt, latents,
            stage_noises, output_type, return_stage_images, backend, attention, compile, callback, progress,
        )
        seed = as_int(seed) if seed is not None else None
        num_images_per_prompt = as_int(num_images_per_prompt)
        if generator is None:
            if seed is None:
                # Under context parallelism every rank must draw the same noises: rank 0's seed.
                seed = _unique_seed() if self._parallel is None else P.seed_from_rank_zero(_unique_seed())
            generator = torch.Generator(device="cpu").manual_seed(seed)
        else:
            seed = generator.initial_seed()
        sigmas_for_sharpening = _SharpeningSigmas(config, seed)
        if self._parallel is not None and (memory_budget is not None or self.placement is not None):
            raise HiFlowInputError(
                "memory_budget", memory_budget if memory_budget is not None else self.placement.memory_budget,
                f"None with parallel={str(self._parallel.spec)!r} (block streaming is not planned per rank yet)",
            )
        # memory budget and lossy plan: checked before any work
        memory = plan_for_call(self, config, memory_budget, compile=compile, lossy=lossy)
        parallel = self._parallel
        if parallel is not None:
            parallel.setup(self.device)  # the mesh on the pipeline's device type (checked above)
        progress = progress and P.is_main_process()  # one set of progress bars per run

        device, dtype = self.device, self.dtype
        with memory.text_encoding() as encode_device:
            embeds, pooled = self._encode_prompt(
                prompt, prompt_embeds, pooled_prompt_embeds, num_images_per_prompt, config.max_sequence_length, encode_device
            )
        batch = embeds.shape[0]
        channels = self.latent_channels
        txt_ids = L.text_ids(embeds.shape[1], device=device, dtype=dtype)

        base_hw = L.latent_hw(config.height, config.width)
        schedule = base_schedule(self.scheduler, config.num_inference_steps, (base_hw[0] // 2) * (base_hw[1] // 2))
        if stage_noises is not None and len(stage_noises) != len(config.stages):
            raise HiFlowInputError(
                "stage_noises", f"{len(stage_noises)} tensors", f"one tensor per high-res stage ({len(config.stages)})"
            )

        shape = (batch, channels, *base_hw)
        if latents is None:
            from diffusers.utils.torch_utils import randn_tensor

            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise HiFlowInputError("latents", tuple(latents.shape), f"unpacked base noise of shape {list(shape)}")
        L.check_finite(latents, "given as the base noise")
        x = L.pack(latents.to(device=device, dtype=dtype))

        # Clean estimates by base-schedule index: a stage reads the latest one written at its
        # timestep. Only indices a later stage will run are kept.
        x0_by_index: dict[int, tuple[torch.Tensor, tuple[int, int]]] = {}
        stage_starts = [schedule.stage_start(stage.steps) for stage in config.stages]
        stage_images: list[Any] = []
        proportional = config.proportional_attention or config.official_compat

        stage_name = "the setup"
        try:
            with fast_transformer(
                self.transformer, proportional=proportional, attention=attention, kernels=backend, compile=compile
            ) as patch, memory, (parallel.applied(self.transformer) if parallel else contextlib.nullcontext()), (
                parallel.split_vae_tiles(self.vae) if parallel else contextlib.nullcontext()
            ):
                if parallel is not None:
                    patch.use_parallel(parallel)
                memory.stage(0)  # memory budget: the base stage's resident blocks
                patch.use_base()
                stage_name = f"the base stage ({config.height}x{config.width})"
                nonfinite: list[torch.Tensor] = []
                x, hw = self._run_base_stage(
                    x, base_hw, schedule, embeds, pooled, txt_ids, config, x0_by_index, callback, progress, nonfinite
                )
                self._forget_unneeded(x0_by_index, stage_starts, 0)
                if parallel is not None:  # first: a rank alone with NaN must not raise while the others wait
                    P.check_replicated(x, stage_name)
                _check_steps_finite(nonfinite, stage_name)
                with V.vae_tiling(self.vae, True):  # the official pipeline tiles the VAE after the base stage
                    prev_image = None
                    for k, stage in enumerate(config.stages, start=1):
                        stage_name = f"high-res stage {k} of {len(config.stages)} ({stage.height}x{stage.width})"
                        memory.stage(k)  # memory budget: stage k's resident blocks, before its entry VAE work
                        size = (stage.height, stage.width)
                        guidance, prev_image = V.guidance_latents(
                            self.vae,
                            x,
                            hw,
                            size,
                            sigma=sigmas_for_sharpening.next(),
                            kernel_size=config.sharpening_kernel_size,
                            amount=config.sharpening_amount,
                        )
                        if return_stage_images:
                            stage_images.append(self._finish_image(prev_image, hw, self._stage_hw(config, k - 1), config, output_type))
                        guidance = guidance.to(dtype)
                        start = stage_starts[k - 1]
                        if stage_noises is not None:
                            noise = stage_noises[k - 1].to(device=device, dtype=dtype)
                            if noise.shape != guidance.shape:
                                raise HiFlowInputError(
                                    f"stage_noises[{k - 1}]", tuple(noise.shape), f"packed shape {list(guidance.shape)}"
                                )
                        else:
                            from diffusers.utils.torch_utils import randn_tensor

                            noise = randn_tensor(guidance.shape, generator=generator, device=device, dtype=dtype)
                        sigma_start = schedule.sigmas[start].to(device)
                        x = renoise(guidance, noise, sigma_start).to(dtype)
                        if callback is not None:
                            callback(StageStart(k, guidance, x, float(sigma_start)))
                        patch.use_highres(stage.ntk_factor)
                        nonfinite = []
                        x, hw = self._run_highres_stage(
                            k, x, stage, start, schedule, embeds, pooled, txt_ids, config, x0_by_index,
                            sigmas_for_sharpening, backend, callback, progress, nonfinite,
                        )
                        self._forget_unneeded(x0_by_index, stage_starts, k)
                        if parallel is not None:
                            P.check_replicated(x, stage_name)
                        _check_steps_finite(nonfinite, stage_name)
                    memory.stage(None)  # memory budget: no block on the device for the final decode
                    final_target = self._stage_hw(config, len(config.stages))
                    images = None
                    if output_type != "latent" or return_stage_images:
                        stage_name = "the final VAE decode"
                        image = V.decode(self.vae, x, hw)
                        if return_stage_images:
                            stage_images.append(self._finish_image(image, hw, final_target, config, output_type))
                        if output_type != "latent":
                            images = self._finish_image(image, hw, final_target, config, output_type)
        except Exception as exc:
            # Out of memory is reported with the stage it happened in (one line, no traceback).
            if is_out_of_memory(exc) and not isinstance(exc, StageOutOfMemoryError):
                detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise StageOutOfMemoryError(stage_name, device, detail) from exc
            raise
        return HiFlowOutput(images=images, latents=x, latent_hw=hw, seed=seed, stage_images=stage_images, memory_plan=memory.label)

    @staticmethod
    def _stage_hw(config: HiFlowConfig, k: int) -> tuple[int, int]:
        if k == 0:
            return L.latent_hw(config.height, config.width)
        stage = config.stages[k - 1]
        return L.latent_hw(stage.height, stage.width)

    def _finish_image(self, image, hw, target_hw, config: HiFlowConfig, output_type: str = "pil"):
        """Crop a decode of the swin-padded grid back to the requested size (unless
        official_compat), then post-process."""
        if hw != target_hw and not config.official_compat:
            border = (hw[0] - target_hw[0]) // 2 * L.VAE_DOWNSAMPLE
            image = image[..., border:-border, border:-border]
        return self._postprocess(image, "pil" if output_type == "latent" else output_type)

    @staticmethod
    def _forget_unneeded(x0_by_index: dict, stage_starts: list[int], done: int) -> None:
        remaining = stage_starts[done:]
        if not remaining:
            x0_by_index.clear()
            return
        keep_from = min(remaining)
        for index in [i for i in x0_by_index if i < keep_from]:
            del x0_by_index[index]

    def _transformer(self, x, t, guidance, pooled, embeds, txt_ids, img_ids):
        timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
        return self.transformer(
            hidden_states=x,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]

    def _run_base_stage(
        self, x, hw, schedule: Schedule, embeds, pooled, txt_ids, config, x0_by_index, callback, progress, nonfinite
    ):
        device = x.device
        img_ids = L.image_ids(*hw, device=device, dtype=x.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full([1], config.guidance_scale, device=device, dtype=torch.float32).expand(x.shape[0])
        timesteps = schedule.timesteps.to(device)
        sigmas = schedule.sigmas.to(device)
        for i in tqdm(range(schedule.num_steps), desc="base stage", disable=not progress, leave=False):
            v = self._transformer(x, timesteps[i], guidance, pooled, embeds, txt_ids, img_ids)
            sample = x.float()
            pred_x0 = sample - v * sigmas[i]
            x = (sample + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
            x0_by_index[i] = (pred_x0, hw)
            nonfinite.append(_nonfinite_flag(x))
            if callback is not None:
                callback(StepEnd(0, i, i, hw, x, pred_x0))
        return x, hw

    def _run_highres_stage(
        self, k, x, stage, start, schedule: Schedule, embeds, pooled, txt_ids, config: HiFlowConfig,
        x0_by_index, sharpening_sigmas, backend, callback, progress, nonfinite,
    ):
        device = x.device
        hw = L.latent_hw(stage.height, stage.width)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.tensor([stage.guidance_scale], device=device)
        timesteps = schedule.timesteps.to(device)
        state = VelocityState()
        text_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        target_hw = hw

        def grid(i: int) -> tuple[int, int]:
            # Swin patchify: even steps run on the grid padded by one latent pixel per side.
            padded = config.swin_patchify and i % 2 == 0
            return (target_hw[0] + 2, target_hw[1] + 2) if padded else target_hw

        # The step kernel writes its output straight onto the next step's grid. A callback
        # wants each step's latents on that step's own grid (as the official code reports
        # them), so then the move is a separate copy; pad and crop are exact either way.
        fold_swin_moves = callback is None
        if grid(0) != hw:
            x = L.swin_pad_packed(x, *hw)
        for i in tqdm(range(stage.steps), desc=f"stage {k} ({stage.height}x{stage.width})", disable=not progress, leave=False):
            index = start + i
            hw = grid(i)
            if not fold_swin_moves and i > 0 and grid(i - 1) != hw:
                previous = grid(i - 1)
                move = L.swin_pad_packed if hw[0] > previous[0] else L.swin_crop_packed
                x = move(x, *previous)
            next_hw = grid(i + 1) if fold_swin_moves and i + 1 < stage.steps else hw
            img_ids = L.image_ids(*hw, device=device, dtype=x.dtype)
            step_embeds, step_txt_ids = embeds, txt_ids
            if config.text_duplication:
                if hw not in text_cache:
                    text_cache[hw] = duplicate_text(embeds, txt_ids, hw[0] // 2, hw[1] // 2)
                step_embeds, step_txt_ids = text_cache[hw]
            v = self._transformer(x, timesteps[index], guidance, pooled, step_embeds, step_txt_ids, img_ids)
            decay = (stage.steps - i) / stage.steps
            ref_x0, ref_hw = x0_by_index[index]
            if config.upsampling == "pixel":
                ref_x0 = V.pixel_reference(
                    self.vae,
                    ref_x0,
                    ref_hw,
                    hw,
                    sigma=sharpening_sigmas.next(),
                    kernel_size=config.sharpening_kernel_size,
                    amount=config.sharpening_amount,
                ).float()
                ref_hw = hw
            out = guidance_step(
                x,
                v,
                ref_x0,
                hw=hw,
                ref_hw=ref_hw,
                sigma=schedule.sigma(index),
                sigma_next=schedule.sigma(index + 1),
                alpha=stage.alpha * decay,
                beta=stage.beta * decay,
                structure_guidance=config.structure_guidance,
                filter_ratio=stage.filter_ratio,
                butterworth_order=config.butterworth_order,
                state=state,
                backend=backend,
                next_hw=next_hw,
            )
            x, state = out.prev_sample, out.state
            x0_by_index[index] = (out.pred_x0, hw)
            nonfinite.append(_nonfinite_flag(x))
            if callback is not None:
                callback(StepEnd(k, i, index, hw, x, out.pred_x0))
        return x, hw
