"""Policy-gradient fine-tuning (Flow-GRPO): groups of SDE samples per prompt, group-normalised advantages from the
latent reward, a clipped PPO objective over the stored transitions, and a KL to the base model."""

from __future__ import annotations

import torch

from .common import RewardMeter, StepContext
from .reward_fns import call_reward
from .sampling import (
    euler_step,
    generator_lora_disabled,
    guided_velocity,
    inference_schedule,
    initial_latents,
    sde_step,
)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, std: str = "group") -> torch.Tensor:
    """`(r - mean_group) / (s + eps)` for rewards laid out as consecutive groups of `group_size`, with `s` the
    group's std (`std="group"`) or the std of all centred rewards of the batch (`"batch"`)."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {group_size}.")
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std == "group":
        scale = groups.std(dim=1, keepdim=True, unbiased=False)
    elif std == "batch":
        scale = centred.pow(2).mean().sqrt()
    else:
        raise ValueError(f"`std` must be 'group' or 'batch', got {std!r}.")
    return (centred / (scale + eps)).view(-1)


def grpo_step(ctx: StepContext, prompts: list[str], meter: RewardMeter) -> dict[str, float]:
    """One Flow-GRPO update on a batch of prompts.

    1. Sample `group_size` trajectories per prompt (CFG), from one shared starting noise per prompt when
       `share_initial_noise` (so a group's rewards differ only through the sampler's own noise, which the
       log-probabilities credit), with the SDE sampler (noise level `eta`, on a coarse lattice with `sde_noise_grid`)
       on the first `sde_steps` steps and the ODE on the rest, storing each SDE transition and its log-probability
       under the current policy (no gradient).
    2. Score the final latents with the reward (no gradient); advantages are normalised within each prompt's group
       and clipped to `adv_clip_max`.
    3. For `inner_epochs` epochs, over `train_timesteps` of the SDE transitions per trajectory (a random subset; all
       if None), minimise the PPO loss `mean(max(-A r, -A clip(r, 1 - clip_range, 1 + clip_range)))` with `r` the
       ratio of the current to the stored transition probability, plus `kl_weight` times the KL between the current
       and the base model's (LoRA disabled) Gaussian transitions, `|mean - mean_ref|^2 / (2 std^2)` averaged over
       elements.
       Gradients are accumulated over the transitions, one optimiser step per epoch.
    """
    config, transformer = ctx.config, ctx.pipe.transformer
    group = config.group_size
    cond = ctx.encode(prompts).repeat_interleave(group)
    starts = len(prompts) if config.share_initial_noise else len(prompts) * group
    latents = initial_latents(ctx.pipe, starts, ctx.height, ctx.width, ctx.generator)
    if config.share_initial_noise:
        latents = latents.repeat_interleave(group, 0)
    sigmas, timesteps = inference_schedule(ctx.pipe, config.num_inference_steps, latents.shape)
    num_steps = config.num_inference_steps
    sde_steps = num_steps if config.sde_steps is None else min(config.sde_steps, num_steps)

    def transition(x, velocity, i, **kwargs):  # the SDE step from sampling step i, as sampled and as trained
        return sde_step(
            x, velocity, sigmas[i], sigmas[i + 1], sigmas[1], config.eta, noise_grid=config.sde_noise_grid, **kwargs
        )

    trajectory, old_log_probs = [latents], []
    with torch.no_grad():
        for i in range(num_steps):
            velocity = guided_velocity(transformer, latents, timesteps[i], cond, config.guidance_scale)
            if i < sde_steps:
                latents, log_prob, _, _ = transition(latents, velocity, i, generator=ctx.generator)
                old_log_probs.append(log_prob)
            else:  # the deterministic rest of the trajectory: no decision to credit, nothing to train
                latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            trajectory.append(latents)
        repeated = [p for p in prompts for _ in range(group)]
        with meter.measure():
            rewards = call_reward(ctx.reward_fn, latents, cond.prompt_embeds, cond.pooled_prompt_embeds, repeated)
    advantages = group_advantages(rewards, group, std=config.advantage_std).clamp(
        -config.adv_clip_max, config.adv_clip_max
    )
    advantages = advantages.to(latents.device)

    if config.train_timesteps is None or config.train_timesteps >= sde_steps:
        train_steps = list(range(sde_steps))
    else:
        train_steps = sorted(torch.randperm(sde_steps, generator=ctx.generator)[: config.train_timesteps].tolist())

    stats = {"loss": 0.0, "kl": 0.0, "ratio_mean": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
    count = config.inner_epochs * len(train_steps)
    for _ in range(config.inner_epochs):
        for i in train_steps:
            x, x_next = trajectory[i], trajectory[i + 1]
            velocity = guided_velocity(
                transformer,
                x,
                timesteps[i],
                cond,
                config.guidance_scale,
                detach_unconditional=not config.train_unconditional,
            )
            _, log_prob, mean, std = transition(x, velocity, i, next_latents=x_next)
            ratio = torch.exp(log_prob - old_log_probs[i])
            clipped = torch.clamp(ratio, 1.0 - config.clip_range, 1.0 + config.clip_range)
            loss = torch.maximum(-advantages * ratio, -advantages * clipped).mean()
            kl = torch.zeros((), device=x.device)
            if config.kl_weight > 0:
                with torch.no_grad(), generator_lora_disabled(transformer):
                    reference = guided_velocity(transformer, x, timesteps[i], cond, config.guidance_scale)
                    _, _, reference_mean, _ = transition(x, reference, i, next_latents=x_next)
                kl = ((mean - reference_mean) ** 2).mean(dim=tuple(range(1, mean.ndim))).mean() / (2 * std**2)
                loss = loss + config.kl_weight * kl
            (loss / len(train_steps)).backward()
            stats["loss"] += loss.item() / count
            stats["kl"] += kl.item() / count
            stats["ratio_mean"] += ratio.mean().item() / count
            stats["clip_fraction"] += ((ratio - 1).abs() > config.clip_range).float().mean().item() / count
        stats["grad_norm"] += ctx.optimizer_step() / config.inner_epochs
    varied = (rewards.view(-1, group).std(dim=1) > 0).float().mean().item()  # groups that carry a signal
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "groups_varied": varied,
        **stats,
    }
