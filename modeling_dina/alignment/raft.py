"""Reward-ranked fine-tuning (RAFT, Dong et al. 2023): sample a group of candidates per prompt with the policy's own
sampler, keep the one the reward ranks first, and fit the generator to it with the flow-matching loss. The reward is
only used to rank (as best-of-N uses it) and needs no gradient and no log-probabilities."""

from __future__ import annotations

import torch

from .common import RewardMeter, StepContext, flow_matching_loss, pretrain_loss
from .reward_fns import call_reward
from .sampling import euler_step, guided_velocity, inference_schedule, initial_latents


def sample_groups(ctx: StepContext, prompts: list[str], meter: RewardMeter):
    """`group_size` candidates per prompt from the Euler (ODE) sampler with CFG, as inference makes them, and their
    rewards (no gradient). Returns `(latents, rewards)`, laid out as consecutive groups of `group_size`."""
    config, transformer = ctx.config, ctx.pipe.transformer
    group = config.group_size
    cond = ctx.encode(prompts).repeat_interleave(group)
    latents = initial_latents(ctx.pipe, len(prompts) * group, ctx.height, ctx.width, ctx.generator)
    sigmas, timesteps = inference_schedule(ctx.pipe, config.num_inference_steps, latents.shape)
    repeated = [p for p in prompts for _ in range(group)]
    with torch.no_grad():
        for i in range(config.num_inference_steps):
            velocity = guided_velocity(transformer, latents, timesteps[i], cond, config.guidance_scale)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
        with meter.measure():
            rewards = call_reward(ctx.reward_fn, latents, cond.prompt_embeds, cond.pooled_prompt_embeds, repeated)
    return latents, rewards


def raft_step(ctx: StepContext, prompts: list[str], meter: RewardMeter) -> dict[str, float]:
    """One RAFT update on a batch of prompts.

    1. Sample `group_size` candidates per prompt with the Euler (ODE) sampler and CFG, as inference does.
    2. Score them (no gradient) and keep each prompt's best.
    3. `inner_epochs` optimiser steps of the flow-matching loss on the kept latents (a fresh noise level each; of the
       guided velocity with `fit_guided`), plus `pretrain_weight` times the conditional loss on real data when given.
    """
    config, group = ctx.config, ctx.config.group_size
    fitted_scale = config.guidance_scale if config.fit_guided else 1.0
    latents, rewards = sample_groups(ctx, prompts, meter)
    best = rewards.view(-1, group).argmax(dim=1).cpu() + torch.arange(len(prompts)) * group
    kept = latents[best.to(latents.device)]

    stats = {"loss": 0.0, "pretrain_loss": 0.0, "grad_norm": 0.0}
    for _ in range(config.inner_epochs):
        loss = flow_matching_loss(ctx, kept, prompts, fitted_scale)
        if config.pretrain_weight > 0:
            pretrain = pretrain_loss(ctx)
            stats["pretrain_loss"] += pretrain.item() / config.inner_epochs
            loss = loss + config.pretrain_weight * pretrain
        loss.backward()
        stats["loss"] += loss.item() / config.inner_epochs
        stats["grad_norm"] += ctx.optimizer_step() / config.inner_epochs
    kept_rewards = rewards[best.to(rewards.device)]
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "kept_reward_mean": kept_rewards.mean().item(),
        **stats,
    }
