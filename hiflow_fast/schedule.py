"""The HiFlow timestep schedule.

Every stage re-uses the *base* schedule: sigmas = linspace(1, 1/N, N) shifted with the `mu` of
the base token count (the official code passes `mu` and the scheduler's config decides the
shift; the official `use_dynamic_shifting = False` sets an instance attribute that
`set_timesteps` never reads). A high-res stage with n steps runs the last n timesteps and
re-noises at the first of them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Linear interpolation of the time-shift exponent `mu` in the image token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


@dataclass(frozen=True)
class Schedule:
    """The base schedule shared by every stage: N timesteps and N + 1 sigmas (trailing 0)."""

    timesteps: torch.Tensor  # [N] float32, sigma * num_train_timesteps
    sigmas: torch.Tensor  # [N + 1] float32
    mu: float

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def stage_start(self, steps: int) -> int:
        """Index of the first timestep a stage of `steps` steps runs."""
        return self.num_steps - steps

    def sigma(self, index: int) -> float:
        return float(self.sigmas[index])


def base_schedule(scheduler, num_inference_steps: int, image_seq_len: int) -> Schedule:
    """The official schedule, computed on a copy of `scheduler` (the user's is not touched)."""
    sched = copy.deepcopy(scheduler)
    cfg = sched.config
    sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
    mu = calculate_shift(
        image_seq_len,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sched.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
    return Schedule(
        timesteps=sched.timesteps.detach().to(torch.float32).clone(),
        sigmas=sched.sigmas.detach().to(torch.float32).clone(),
        mu=float(mu),
    )
