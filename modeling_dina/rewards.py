"""Adapters from a [`DiNaRewardPipeline`] to the reward interfaces of alignment frameworks.

- `make_reward_fn`: the Flow-GRPO / DDPO callable `fn(images, prompts, metadata) -> (scores, info)`.
- `make_latent_reward_fn`: `fn(latents, prompt_embeds, pooled_prompt_embeds) -> rewards` on the generator's own clean
  latents (no VAE decode), optionally differentiable for direct reward back-propagation.
- `best_of_n`: pick the best of N candidates for one prompt.
- `DiNaScorer`: a pipeline as a benchmark `Scorer` (`evaluation.run_benchmark`), at one noise level or an ensemble,
  with noise shared within a prompt or drawn independently per image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .baselines import Scorer
from .noise import NOISE_MODES
from .pipeline_dina import DiNaRewardPipeline


def make_reward_fn(
    pipe: DiNaRewardPipeline,
    noise_level: float | None = None,
    noise_levels: Sequence[float] | None = None,
    *,
    normalized: bool = True,
    batch_size: int = 8,
) -> Callable:
    """A Flow-GRPO / DDPO-style reward function.

    The returned `fn(images, prompts, metadata)` accepts a float `(N, C, H, W)` tensor in [0, 1], a uint8
    `(N, H, W, C)` numpy array or a list of PIL images (anything `pipe` accepts), one prompt per image (or one for
    all); `metadata` is accepted for the interface and not used. It returns `(scores, info)`: `scores` a float32 numpy
    array, `(N,)` (the normalised score, or the raw reward with `normalized=False`), and `info` with the raw `rewards`
    and the `sigmas` used.
    """
    _check_pipe(pipe)

    def reward_fn(images, prompts, metadata=None):
        prompt = prompts if isinstance(prompts, str) else list(prompts)
        out = pipe(prompt, images=images, noise_level=noise_level, noise_levels=noise_levels, batch_size=batch_size)
        values = out.scores if normalized else out.rewards
        info = {"rewards": out.rewards.cpu().numpy(), "sigmas": out.sigmas.tolist()}
        return values.cpu().numpy().astype(np.float32), info

    return reward_fn


def make_latent_reward_fn(
    pipe: DiNaRewardPipeline,
    noise_level: float | None = None,
    noise_levels: Sequence[float] | None = None,
    *,
    differentiable: bool = False,
    normalized: bool = False,
    batch_size: int = 8,
) -> Callable:
    """A reward on a generator's clean latents and its prompt encoding: `fn(latents, prompt_embeds,
    pooled_prompt_embeds, prompt_embeds_mask=None) -> rewards` (a `(B,)` tensor on the pipeline's device, raw unless
    `normalized`; pooled for SD3 and FLUX, else `None`; the mask for Qwen-Image and Z-Image).

    With `differentiable=True` gradients flow from the rewards to `latents` (and to the reward model's trainable
    weights). Encode prompts with `max_sequence_length=pipe.reward_model.config.max_sequence_length` to match training.
    """
    _check_pipe(pipe)

    def latent_reward_fn(latents, prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask=None):
        out = pipe(
            latents=latents,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            prompt_embeds_mask=prompt_embeds_mask,
            noise_level=noise_level,
            noise_levels=noise_levels,
            differentiable=differentiable,
            batch_size=batch_size,
        )
        return out.scores if normalized else out.rewards

    return latent_reward_fn


@dataclass
class BestOfN:
    """
    Args:
        index (`int`): position of the best candidate.
        rewards (`torch.Tensor` of shape `(N,)`): raw reward of every candidate, in input order.
        ranking (`list[int]`): candidate positions from best to worst.
    """

    index: int
    rewards: torch.Tensor
    ranking: list[int]


def best_of_n(pipe: DiNaRewardPipeline, prompt: str, candidates, *, as_latents: bool = False, **kwargs) -> BestOfN:
    """Score N candidates for one prompt (all with the same noise draw when they share a size) and rank them.

    `candidates` are images (any form `pipe` accepts), or with `as_latents=True` a `(N, C, H, W)` tensor of clean
    latents. `kwargs` go to the pipeline call (`noise_level`, `noise_levels`, `batch_size`, ...).
    """
    _check_pipe(pipe)
    if not isinstance(prompt, str):
        raise TypeError(f"`prompt` must be one string (the prompt all candidates answer), got {type(prompt).__name__}.")
    inputs = {"latents": candidates} if as_latents else {"images": candidates}
    rewards = pipe(prompt, **inputs, **kwargs).rewards
    ranking = torch.argsort(rewards, descending=True, stable=True).tolist()
    return BestOfN(index=ranking[0], rewards=rewards, ranking=ranking)


def _check_pipe(pipe) -> None:
    if not isinstance(pipe, DiNaRewardPipeline):
        raise TypeError(f"`pipe` must be a DiNaRewardPipeline, got {type(pipe).__name__}.")


__all__ = ["BestOfN", "DiNaScorer", "best_of_n", "make_latent_reward_fn", "make_reward_fn"]


class DiNaScorer(Scorer):
    """A DiNa pipeline behind the benchmark runner's `Scorer` interface, at one noise level or an ensemble.

    `noise="shared"` scores a batch in one pipeline call: images of one prompt and size see the same noise draw
    (common random numbers, the pipeline's default), so a pair's score difference reflects the images alone.
    `noise="independent"` gives every image its own draw, as the authors' evaluation does (`randn_like` per call):
    each image is scored alone with a generator seeded from `seed`, its prompt and its pixels, so a score does not
    depend on the batch it came in and a rerun reproduces it (one pipeline call per image: slower). Default names:
    `dina@<level>` and `dina-independent@<level>` (`-seed<seed>` added for a seed other than 0), so the benchmark
    runner's per-scorer caches never mix the modes.
    """

    def __init__(
        self,
        pipe: DiNaRewardPipeline,
        noise_level: float | None = None,
        noise_levels: Sequence[float] | None = None,
        name: str | None = None,
        batch_size: int = 16,
        noise: str = "shared",
        seed: int = 0,
    ):
        if (noise_level is None) == (noise_levels is None):
            raise ValueError("give exactly one of `noise_level` and `noise_levels`.")
        if noise not in NOISE_MODES:
            raise ValueError(f"`noise` must be one of {NOISE_MODES}, got {noise!r}.")
        label = f"{noise_level}" if noise_level is not None else "ensemble"
        family = "dina" if noise == "shared" else "dina-independent" + (f"-seed{seed}" if seed else "")
        params = sum(p.numel() for p in pipe.reward_model.parameters())
        super().__init__(name or f"{family}@{label}", params, batch_size)
        self.pipe, self.noise_level = pipe, noise_level if noise_level is not None else list(noise_levels)
        self.noise, self.seed = noise, seed

    def prepare_images(self, images: list) -> list:
        """The images as given: the pipeline reads them itself, through the same image processor as the cache."""
        return images

    def _score_batch(self, prompts: list[str], images: list) -> torch.Tensor:
        levels = {"noise_levels" if isinstance(self.noise_level, list) else "noise_level": self.noise_level}
        if self.noise == "shared":
            return self.pipe(prompt=prompts, images=images, batch_size=len(images), **levels).rewards
        return torch.cat(
            [
                self.pipe(prompt=prompt, images=[image], generator=self.generator(prompt, image), **levels).rewards
                for prompt, image in zip(prompts, images)
            ]
        )

    def generator(self, prompt: str, image) -> torch.Generator:
        """The CPU generator of one image's noise draw in `independent` mode, seeded from `seed`, prompt and pixels."""
        key = f"{self.seed}|{prompt}|{image.mode}|{image.size}".encode() + image.tobytes()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1)
