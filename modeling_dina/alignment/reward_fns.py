"""Latent reward callables for alignment: `fn(latents, prompt_embeds, pooled_prompt_embeds) -> rewards (B,)`.

Any callable of that form works. One that also accepts a `prompts` keyword gets the prompt strings (a pixel-space
checker needs them); `call_reward` passes them when the callable takes them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
from diffusers import StableDiffusion3Pipeline

from ..modeling_dina import DiNaRewardModel


class DiNaLatentReward:
    """Differentiable DiNa-LRM reward of clean latents (`DiNaRewardModel.score_clean` with a fresh Gaussian draw per
    call). Several levels form the noise ensemble of SPEC §3 (same draw for all).

    Args:
        model: the reward model (its backbone may be shared with the generator being aligned).
        noise_level: requested level(s) in [0, 1], snapped to the model's training grid (released: 0.4).
        seed: seed of the noise draws (`self.generator`, a CPU generator; checkpointed by the alignment loop).

    `scored`: None, or a list to which every call with `prompts` appends `(latents, prompts)` (detached, on the CPU):
    the samples an alignment method scored, which an on-policy reward refresh can label without sampling again.
    """

    def __init__(self, model: DiNaRewardModel, noise_level: float | Sequence[float] = 0.4, seed: int = 0):
        self.model = model
        levels = [noise_level] if isinstance(noise_level, (int, float)) else list(noise_level)
        if not levels:
            raise ValueError("`noise_level` must name at least one level.")
        self.noise_levels = levels
        self.levels = {"noise_level": levels[0]} if len(levels) == 1 else {"noise_levels": levels}
        self.generator = torch.Generator().manual_seed(seed)
        self.scored: list[tuple[torch.Tensor, list[str]]] | None = None

    def __call__(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Raw rewards `(B,)` in float32; `noise` (shaped like `latents`) replaces the draw. With `prompts`, the
        samples of one prompt share one draw (common random numbers, SPEC §1): within a group of samples of a prompt
        (GRPO, RAFT, DPO) reward differences then come from the images, not from the scoring noise. Prompt inputs
        are the reward model's family's (pooled: SD3, FLUX; `encoder_attention_mask`: Qwen-Image, Z-Image)."""
        if noise is None:
            if prompts is None:
                noise = torch.randn(latents.shape, generator=self.generator)
            else:
                distinct = list(dict.fromkeys(prompts))
                draws = torch.randn((len(distinct), *latents.shape[1:]), generator=self.generator)
                noise = draws[torch.tensor([distinct.index(p) for p in prompts])]
        if prompts is not None and self.scored is not None:
            self.scored.append((latents.detach().cpu(), list(prompts)))
        out = self.model.score_clean(
            latents, prompt_embeds, pooled_prompt_embeds, encoder_attention_mask, noise=noise, **self.levels
        )
        return out.rewards


@torch.no_grad()
def decode_latents(pipe: StableDiffusion3Pipeline, latents: torch.Tensor) -> list:
    """PIL images of latents, decoded as `StableDiffusion3Pipeline.__call__` does."""
    vae = pipe.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    return pipe.image_processor.postprocess(vae.decode(latents, return_dict=False)[0], output_type="pil")


def make_pixel_reward_fn(pipe: StableDiffusion3Pipeline, pixel_fn: Callable) -> Callable:
    """A latent reward from a pixel-space one: decode with the pipeline's VAE, then `pixel_fn(images, prompts)` (PIL
    images and prompt strings -> one number per image). Not differentiable: use it with GRPO."""

    def reward(latents, prompt_embeds, pooled_prompt_embeds, *, prompts):
        images = decode_latents(pipe, latents)
        return torch.as_tensor(pixel_fn(images, list(prompts)), dtype=torch.float32, device=latents.device)

    return reward


def call_reward(
    reward_fn: Callable,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    prompts: Sequence[str],
) -> torch.Tensor:
    """`reward_fn` on a batch (with `prompts=` when it accepts that keyword), checked to give one value per sample."""
    params = inspect.signature(reward_fn).parameters
    takes_prompts = "prompts" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {"prompts": list(prompts)} if takes_prompts else {}
    rewards = reward_fn(latents, prompt_embeds, pooled_prompt_embeds, **kwargs)
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (latents.shape[0],):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"the reward function must return a tensor of shape ({latents.shape[0]},), got {shape}.")
    return rewards
