"""What one alignment step needs (`StepContext`), the reward part's meter, the optimiser step and the policy EMA."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from diffusers import StableDiffusion3Pipeline
from torch.utils.flop_counter import FlopCounterMode

from .config import AlignmentConfig
from .sampling import PromptEmbeddings, encode_prompts, guided_velocity

# `fn(batch_size, generator) -> (clean latents (B, C, H, W), prompts)`: real data for ReFL's flow-matching regulariser.
PretrainData = Callable[[int, torch.Generator], tuple[torch.Tensor, list[str]]]


class ParameterEMA:
    """An exponential moving average of parameters (the policy EMA of the ReFL recipe), swapped in with `applied()`
    for evaluation and saving."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self):
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - self.decay)

    @contextmanager
    def applied(self):
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)


@dataclass
class StepContext:
    """The objects an alignment step works on; `generator` (CPU) draws every random number of the run."""

    pipe: StableDiffusion3Pipeline
    reward_fn: Callable
    config: AlignmentConfig
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    generator: torch.Generator
    height: int
    width: int
    max_sequence_length: int
    pretrain_data: PretrainData | None = None
    ema: ParameterEMA | None = None
    step_callback: Callable | None = None

    def encode(self, prompts: list[str]) -> PromptEmbeddings:
        return encode_prompts(
            self.pipe,
            prompts,
            guidance_scale=self.config.guidance_scale,
            max_sequence_length=self.max_sequence_length,
            negative_prompt=self.config.negative_prompt,
        )

    def optimizer_step(self) -> float:
        """Clip (if `max_grad_norm` is set), step, zero the gradients; returns the gradient norm before clipping."""
        max_norm = self.config.max_grad_norm if self.config.max_grad_norm is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        return float(norm)

    def policy(self):
        """The weights to evaluate and save: the EMA's when the run keeps one, else the current ones."""
        return self.ema.applied() if self.ema is not None else nullcontext()


class RewardMeter:
    """Wall time (device-synchronised) and, optionally, FLOPs (`FlopCounterMode`) of the code run under `measure()`."""

    def __init__(self, device: torch.device, count_flops: bool = False):
        self.device = device
        self.seconds = 0.0
        self.flops: int | None = 0 if count_flops else None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self):
        counter = FlopCounterMode(display=False) if self.flops is not None else None
        self._sync()
        start = time.perf_counter()
        if counter is None:
            yield
        else:
            with counter:
                yield
            self.flops += counter.get_total_flops()
        self._sync()
        self.seconds += time.perf_counter() - start


def velocity_errors(
    ctx: StepContext, clean: torch.Tensor, cond: PromptEmbeddings, sigma, noise, guidance_scale: float = 1.0
) -> torch.Tensor:
    """Per-sample mean squared error of the generator's velocity against the rectified-flow target `noise - x0` at
    `x_s = (1 - s) x0 + s noise` (SD3 convention), shape `(B,)`: the conditional velocity, or with
    `guidance_scale > 1` the classifier-free-guided one the sampler follows (`cond` then needs its negative part)."""
    s = sigma.view(-1, *[1] * (clean.ndim - 1))
    noisy = ((1 - s) * clean + s * noise).to(ctx.pipe.transformer.dtype)
    timestep = sigma * ctx.pipe.scheduler.config.num_train_timesteps
    velocity = guided_velocity(ctx.pipe.transformer, noisy, timestep, cond, guidance_scale)
    return (velocity.float() - (noise - clean).float()).pow(2).mean(dim=tuple(range(1, clean.ndim)))


def flow_matching_loss(
    ctx: StepContext, clean: torch.Tensor, prompts: list[str], guidance_scale: float = 1.0
) -> torch.Tensor:
    """The rectified-flow loss of the generator (LoRA active) on clean latents of `prompts`: `velocity_errors` at a
    logit-normal `s` and a fresh Gaussian draw per sample (conditional, or guided with `guidance_scale > 1`)."""
    sigma = torch.sigmoid(torch.randn(len(clean), generator=ctx.generator)).to(clean.device)
    noise = torch.randn(clean.shape, generator=ctx.generator).to(clean.device)
    return velocity_errors(ctx, clean, ctx.encode(list(prompts)), sigma, noise, guidance_scale).mean()


def pretrain_loss(ctx: StepContext) -> torch.Tensor:
    """`flow_matching_loss` on a batch of the run's real data (`pretrain_data`): the ReFL recipe's regulariser."""
    if ctx.pretrain_data is None:
        raise ValueError("`pretrain_weight` > 0 needs real data: pass `pretrain_data=` to `align`.")
    clean, prompts = ctx.pretrain_data(ctx.config.pretrain_batch_size, ctx.generator)
    return flow_matching_loss(ctx, clean, prompts)
