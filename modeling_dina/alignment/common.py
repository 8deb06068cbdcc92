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
from .sampling import PromptEmbeddings, encode_prompts

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
