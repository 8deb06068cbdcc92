"""Online Diffusion-DPO (Wallace et al. 2024, in its rectified-flow form): sample a group of candidates per prompt
with the policy's own sampler, let the reward pick the best and the worst, and raise the policy's likelihood of the
best relative to the worst, measured against the frozen base (LoRA off). Like RAFT the reward only ranks; unlike RAFT
the loser pushes too and the base anchors the update, so the generator does not drift towards its own samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import RewardMeter, StepContext, velocity_errors
from .raft import sample_groups
from .sampling import generator_lora_disabled


def dpo_loss(policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float) -> torch.Tensor:
    """Diffusion-DPO's loss for pairs laid out as `(2, P)` errors (row 0 the winners, row 1 the losers):
    `-log sigmoid(-beta / 2 * ((e_w - e_ref_w) - (e_l - e_ref_l)))`, averaged over the pairs."""
    margin = (policy_errors - reference_errors.detach()).float()
    return -F.logsigmoid(-0.5 * beta * (margin[0] - margin[1])).mean()


def dpo_step(ctx: StepContext, prompts: list[str], meter: RewardMeter) -> dict[str, float]:
    """One online Diffusion-DPO update on a batch of prompts.

    1. Sample `group_size` ODE candidates per prompt (CFG) and score them (no gradient).
    2. Pair each prompt's best with its worst candidate; prompts whose candidates tie are skipped.
    3. `inner_epochs` optimiser steps of `dpo_loss` (`dpo_beta`): both images of a pair are noised to the same
       logit-normal level with the same draw, and the policy's and the base's conditional (with `fit_guided`: guided)
       velocity errors compared.
    """
    config, group = ctx.config, ctx.config.group_size
    scale = config.guidance_scale if config.fit_guided else 1.0
    latents, rewards = sample_groups(ctx, prompts, meter)
    grouped = rewards.view(-1, group).cpu()
    offsets = torch.arange(len(prompts)) * group
    keep = grouped.max(dim=1).values > grouped.min(dim=1).values
    stats = {"loss": 0.0, "grad_norm": 0.0, "pairs": int(keep.sum()), "reward_margin": 0.0}
    result = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}
    if not keep.any():
        return {**result, **stats}
    winners = (grouped.argmax(dim=1) + offsets)[keep]
    losers = (grouped.argmin(dim=1) + offsets)[keep]
    pair_prompts = [p for p, k in zip(prompts, keep.tolist()) if k]
    clean = latents[torch.cat([winners, losers]).to(latents.device)]
    cond = ctx.encode(pair_prompts * 2)
    stats["reward_margin"] = (rewards[winners.to(rewards.device)] - rewards[losers.to(rewards.device)]).mean().item()
    for _ in range(config.inner_epochs):
        sigma = torch.sigmoid(torch.randn(len(pair_prompts), generator=ctx.generator)).repeat(2).to(clean.device)
        noise = torch.randn(len(pair_prompts), *clean.shape[1:], generator=ctx.generator).repeat(2, 1, 1, 1)
        noise = noise.to(clean.device)
        with torch.no_grad(), generator_lora_disabled(ctx.pipe.transformer):
            reference = velocity_errors(ctx, clean, cond, sigma, noise, scale)
        policy = velocity_errors(ctx, clean, cond, sigma, noise, scale)
        loss = dpo_loss(policy.view(2, -1), reference.view(2, -1), config.dpo_beta)
        loss.backward()
        stats["loss"] += loss.item() / config.inner_epochs
        stats["grad_norm"] += ctx.optimizer_step() / config.inner_epochs
    return {**result, **stats}
