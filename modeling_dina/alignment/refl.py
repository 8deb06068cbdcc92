"""Reward-gradient fine-tuning (ReFL / DRaFT-K): backpropagate a differentiable latent reward through the last
sampling steps into the generator's LoRA."""

from __future__ import annotations

import torch
from peft.tuners.lora import LoraLayer

from .common import RewardMeter, StepContext, pretrain_loss
from .reward_fns import call_reward
from .sampling import (
    GENERATOR_ADAPTER,
    euler_step,
    generator_lora_disabled,
    guided_velocity,
    inference_schedule,
    initial_latents,
)


def resolve_reward_step(reward_step: int | list[int], num_steps: int, generator: torch.Generator) -> int:
    """The 0-based sampling step whose x0 prediction is scored (a `[lo, hi]` range is drawn from uniformly)."""
    lo, hi = reward_step if isinstance(reward_step, list) else (reward_step, reward_step)
    lo, hi = (s + num_steps if s < 0 else s for s in (lo, hi))
    if not 0 <= lo <= hi < num_steps:
        raise ValueError(f"`reward_step` {reward_step} is outside the {num_steps} sampling steps.")
    return lo if lo == hi else int(torch.randint(lo, hi + 1, (1,), generator=generator))


def lora_weight_penalty(transformer) -> torch.Tensor:
    """Sum over layers of the squared Frobenius norm of the generator LoRA's weight update `scale * B @ A`."""
    terms = [
        layer.get_delta_weight(GENERATOR_ADAPTER).float().pow(2).sum()
        for layer in transformer.modules()
        if isinstance(layer, LoraLayer) and GENERATOR_ADAPTER in layer.lora_A
    ]
    return torch.stack(terms).sum()


def refl_step(ctx: StepContext, prompts: list[str], meter: RewardMeter) -> dict[str, float]:
    """One ReFL/DRaFT update on a batch of prompts.

    Samples from noise with the flow-matching Euler sampler (with CFG) up to step `j = reward_step`, takes the x0
    prediction `x_j - sigma_j * v_j` there (for the last step this is the sampler's output), scores it with the
    reward, and backpropagates `-reward_scale * mean(reward) + kl_weight * KL` into the generator LoRA through the
    last `grad_steps` model evaluations only (earlier ones run without gradient). With `policy_grad_steps = m` only
    the first m of those evaluations update the LoRA: the later ones carry the reward's gradient back to them (the
    latents' gradient at the hand-over) with the LoRA held fixed, so the LoRA learns where a layout is decided and the
    rest of the chain keeps its change on the image manifold. The reward's own backward pass (to the scored latents)
    runs first, separately, so its cost is measured on its own. With `pretrain_weight` the flow-matching loss on
    real data (`pretrain_loss`) is added, as the authors' ReFL recipe does.
    """
    config, transformer = ctx.config, ctx.pipe.transformer
    cond = ctx.encode(prompts)
    latents = initial_latents(ctx.pipe, len(prompts), ctx.height, ctx.width, ctx.generator)
    sigmas, timesteps = inference_schedule(ctx.pipe, config.num_inference_steps, latents.shape)
    stop = resolve_reward_step(config.reward_step, config.num_inference_steps, ctx.generator)
    first_grad = 0 if config.grad_steps is None else max(0, stop + 1 - config.grad_steps)
    hand_over = stop + 1 if config.policy_grad_steps is None else first_grad + config.policy_grad_steps
    use_prediction_kl = config.kl_weight > 0 and config.kl_type == "prediction"

    kl_terms, handed_over, leaf = [], None, None
    for i in range(stop + 1):
        if i == hand_over:  # from here on the LoRA is held fixed: the graph goes on from a leaf
            handed_over, latents = latents, latents.detach().requires_grad_(True)
            leaf = latents
        with torch.set_grad_enabled(i >= first_grad):
            velocity = guided_velocity(transformer, latents, timesteps[i], cond, config.guidance_scale)
            if use_prediction_kl and first_grad <= i < hand_over:
                with torch.no_grad(), generator_lora_disabled(transformer):
                    reference = guided_velocity(transformer, latents, timesteps[i], cond, config.guidance_scale)
                kl_terms.append((velocity.float() - reference.float()).pow(2).mean())
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1] if i < stop else 0.0)

    scored = latents.detach().requires_grad_(True)
    with meter.measure():
        rewards = call_reward(ctx.reward_fn, scored, cond.prompt_embeds, cond.pooled_prompt_embeds, prompts)
        if rewards.grad_fn is None:
            raise ValueError("the reward is not differentiable w.r.t. the latents; ReFL needs that (use GRPO).")
        reward_loss = -config.reward_scale * rewards.mean()
        (grad,) = torch.autograd.grad(reward_loss, scored)

    if handed_over is not None:  # back through the fixed-LoRA steps to the hand-over latents only, not to the LoRA
        (grad,) = torch.autograd.grad(latents, leaf, grad)
        latents = handed_over
    kl = torch.zeros((), device=latents.device)
    if config.kl_weight > 0:
        kl = torch.stack(kl_terms).mean() if use_prediction_kl else lora_weight_penalty(transformer)
        torch.autograd.backward([latents, config.kl_weight * kl], [grad, None])
    else:
        latents.backward(grad)
    pretrain = torch.zeros(())
    if config.pretrain_weight > 0:
        pretrain = pretrain_loss(ctx)
        (config.pretrain_weight * pretrain).backward()
    grad_norm = ctx.optimizer_step()
    return {
        "reward_mean": rewards.mean().item(),
        "reward_std": rewards.std(unbiased=False).item(),
        "loss": (reward_loss + config.kl_weight * kl + config.pretrain_weight * pretrain).item(),
        "kl": kl.item(),
        "pretrain_loss": pretrain.item(),
        "grad_norm": grad_norm,
        "reward_step": stop,
    }
