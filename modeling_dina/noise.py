"""Noise levels in the SD3 rectified-flow convention (SPEC §1): the training grid, snapping, noising, sampling."""

from __future__ import annotations

import math

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy.special import betaincinv

NOISE_SAMPLING_SCHEMES = ("uniform", "logit_normal", "mode", "beta", "power", "constant")
NOISE_MODES = ("shared", "independent")
"""How evaluation draws noise: one draw for the images of a prompt (common random numbers, SPEC §1), or one per
image (the authors' evaluation: `randn_like` on every call)."""


class NoiseGrid:
    """The noise levels a flow-matching scheduler was trained on, and their transformer timesteps.

    Built from a scheduler *config* (a freshly configured scheduler's `sigmas`), never from a scheduler whose
    `set_timesteps` was called: inference schedules are a different, shorter grid.
    """

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        if sigmas.shape != timesteps.shape or sigmas.ndim != 1 or not len(sigmas):
            raise ValueError("`sigmas` and `timesteps` must be non-empty 1-D tensors of the same length.")
        self.sigmas = sigmas.float()
        self.timesteps = timesteps.float()

    @classmethod
    def from_scheduler_config(cls, scheduler_config: dict | None = None) -> NoiseGrid:
        """The grid of `FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)` (SD3.5 defaults if None)."""
        config = {"shift": 3.0} if scheduler_config is None else dict(scheduler_config)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        return cls(scheduler.sigmas.clone(), scheduler.timesteps.clone())

    def snap(self, noise_levels: torch.Tensor | float | list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest grid sigma and its timestep for each requested level in [0, 1]. Returns `(sigma, timestep)`."""
        u = torch.as_tensor(noise_levels, dtype=torch.float32)
        if u.ndim == 0:
            u = u[None]
        if not torch.isfinite(u).all() or (u < 0).any() or (u > 1).any():
            raise ValueError(f"noise levels must lie in [0, 1], got {u.tolist()}.")
        sigmas = self.sigmas.to(u.device)
        idx = (sigmas[None, :] - u[:, None]).abs().argmin(dim=1)
        return sigmas[idx], self.timesteps.to(u.device)[idx]


def add_noise(clean_latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """`x_sigma = (1 - sigma) * x0 + sigma * eps`, with `sigma` a scalar or one value per sample."""
    if noise.shape != clean_latents.shape:
        raise ValueError(f"`noise` has shape {tuple(noise.shape)}, latents {tuple(clean_latents.shape)}.")
    sigma = torch.as_tensor(sigma, dtype=clean_latents.dtype, device=clean_latents.device)
    if sigma.ndim == 1:
        sigma = sigma.view(-1, *([1] * (clean_latents.ndim - 1)))
    return (1.0 - sigma) * clean_latents + sigma * noise


def noise_latents(
    grid: NoiseGrid,
    latents: torch.Tensor,
    *,
    noise_level: float | torch.Tensor | None = None,
    noise_levels: list[float] | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clean `(B, C, H, W)` latents at snapped noise levels: `(noised, sigmas, timesteps)` in fp32.

    `noise_level` is one level for all items or a `(B,)` tensor of one level per item (noised `(B, C, H, W)`);
    `noise_levels` the K levels of an ensemble (noised `(K, B, C, H, W)`). One draw per item is shared by every
    level: `noise`, else drawn from `generator` on its own device (a seeded CPU generator gives the same noise on
    every device), else from the global RNG."""
    if (noise_level is None) == (noise_levels is None):
        raise ValueError("pass exactly one of `noise_level` (one level) and `noise_levels` (an ensemble).")
    if noise_levels is not None and not len(noise_levels):
        raise ValueError("`noise_levels` is empty: give at least one level for the ensemble.")
    sigmas, timesteps = grid.snap(noise_levels if noise_levels is not None else noise_level)
    sigmas, timesteps = sigmas.to(latents.device), timesteps.to(latents.device)
    if noise is None:
        device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
    clean, noise = latents.float(), noise.to(device=latents.device, dtype=torch.float32)
    if noise_levels is not None:
        noised = torch.stack([add_noise(clean, noise, sigma) for sigma in sigmas])
    else:
        noised = add_noise(clean, noise, sigmas if len(sigmas) > 1 else sigmas[0])
    return noised, sigmas, timesteps


def sample_noise_levels(
    n: int,
    scheme: str = "uniform",
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    beta_alpha: float = 1.0,
    beta_beta: float = 1.0,
    power_exponent: float = 1.0,
    constant_noise_level: float = 0.4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw `n` training noise levels in [0, 1] by one of the schemes of SPEC §1 (to be snapped to the grid).

    `power` is the authors' `r ** power_exponent` with `r` uniform: an exponent above 1 favours low noise levels.
    """
    if scheme == "uniform":
        u = torch.rand(n, generator=generator, device=device)
    elif scheme == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    elif scheme == "mode":
        r = torch.rand(n, generator=generator, device=device)
        u = 1 - r - mode_scale * (torch.cos(math.pi * r / 2) ** 2 - 1 + r)
    elif scheme == "beta":
        # Inverse-CDF sampling keeps the draw on `generator` (torch's Beta sampler takes none).
        r = torch.rand(n, generator=generator, dtype=torch.float64)
        u = torch.from_numpy(betaincinv(float(beta_alpha), float(beta_beta), r.numpy())).float().to(device)
    elif scheme == "power":
        if not power_exponent > 0:
            raise ValueError(f"`power_exponent` must be > 0, got {power_exponent}.")
        u = torch.rand(n, generator=generator, device=device) ** power_exponent
    elif scheme == "constant":
        u = torch.full((n,), float(constant_noise_level), device=device)
    else:
        raise ValueError(f"unknown noise-level sampling scheme {scheme!r}.")
    return u.clamp(0.0, 1.0)
