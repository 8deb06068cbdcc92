"""What the web demo computes, without Gradio: loading the served models and the three tabs' results.

The default is the Shapes world shipped in the package (offline): its generator, DiNa-LRM built on the generator's
own first blocks, and any aligned generator LoRA under `shapes/assets/aligned/<run>/`. Any other DiNa model folder
or Hub id is served for scoring and comparing only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from ..pipeline_dina import DiNaRewardPipeline
from ..shapes.checker import check_many
from ..shapes.generator import load_generator
from ..shapes.grammar import parse_prompt
from ..shapes.report import decode, generate_candidates
from ..shapes.reward import REWARD_DIR

__all__ = [
    "ALIGNED_DIR",
    "AppModels",
    "Candidate",
    "ImageScores",
    "aligned_runs",
    "load_models",
    "plot_levels",
    "score_images",
    "shapes_candidates",
]

ALIGNED_DIR = Path(__file__).parent.parent / "shapes" / "assets" / "aligned"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class AppModels:
    """The served models. `generator` (and `aligned`, run name -> generator with that run's LoRA) only for the
    Shapes world."""

    reward: DiNaRewardPipeline
    name: str
    generator: object | None = None
    aligned: dict[str, object] = field(default_factory=dict)

    @property
    def is_shapes(self) -> bool:
        return self.generator is not None


def aligned_runs(folder: str | os.PathLike = ALIGNED_DIR) -> dict[str, Path]:
    """Aligned generator LoRAs in diffusers' format: run name -> folder, for every subfolder holding the weights."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {run.name: run for run in sorted(folder.iterdir()) if (run / LORA_WEIGHTS).is_file()}


def load_models(
    model: str | None = None, aligned_dir: str | os.PathLike = ALIGNED_DIR, device: str | torch.device | None = None
) -> AppModels:
    """The shipped Shapes world (`model=None` or the shipped reward's folder), or any DiNa model folder / Hub id, on
    `device` (default: the accelerator if there is one, else the CPU)."""
    if device is None:
        accelerator = torch.accelerator.current_accelerator()
        device = accelerator if accelerator is not None else torch.device("cpu")
    if model is not None and Path(model).resolve() != REWARD_DIR.resolve():
        reward = DiNaRewardPipeline.from_pretrained(model).to(device)
        reward.set_progress_bar_config(disable=True)
        return AppModels(reward=reward, name=str(model))
    generator = load_generator(device)
    # The reward reads the generator's own first blocks: one copy of the base, its LoRA on only while scoring.
    reward = DiNaRewardPipeline.from_pipe(generator, reward_model=str(REWARD_DIR))
    reward.set_progress_bar_config(disable=True)
    aligned = {}
    for run, folder in aligned_runs(aligned_dir).items():
        # A separate generator per run: the base keeps its weights, and the reward stays on the base's blocks.
        aligned[run] = load_generator(device)
        aligned[run].load_lora_weights(folder)
    return AppModels(reward=reward, name="Shapes world (shipped)", generator=generator, aligned=aligned)


def plot_levels(reward: DiNaRewardPipeline, noise_level: float) -> list[float]:
    """Noise levels the Score tab plots: a coarse grid, the ensemble's levels and the chosen one."""
    ensemble = reward.reward_model.config.ensemble_noise_levels
    return sorted({0.1, 0.3, 0.5, 0.7, 0.9, *ensemble, round(noise_level, 4)})


@dataclass
class ImageScores:
    """Rewards of N images: `rewards`/`scores` (N,) at `noise_level`, `ensemble` (N,) over `ensemble_levels`, and
    `per_level` (L, N) at `levels`. `order` ranks the images by the ranking reward (the ensemble's if
    `rank_by_ensemble`), best first."""

    rewards: torch.Tensor
    scores: torch.Tensor
    noise_level: float
    sigma: float
    ensemble: torch.Tensor
    ensemble_levels: list[float]
    levels: list[float]
    per_level: torch.Tensor
    order: list[int]
    rank_by_ensemble: bool = False


def score_images(
    reward: DiNaRewardPipeline,
    prompt: str,
    images: Sequence[Image.Image],
    noise_level: float,
    *,
    rank_by_ensemble: bool = False,
    progress=None,
) -> ImageScores:
    """Score `images` against `prompt` at `noise_level`, with the ensemble and at every plotted level.

    `progress(fraction, desc)` is called before each pass over the images."""
    ensemble_levels = list(reward.reward_model.config.ensemble_noise_levels)
    levels = plot_levels(reward, noise_level)
    passes = len(levels) + 2

    def step(i: int, desc: str) -> None:
        if progress is not None:
            progress(i / passes, desc=desc)

    step(0, f"scoring at u={noise_level:g}")
    out = reward(prompt, images=list(images), noise_level=noise_level)
    step(1, "scoring the ensemble")
    ensemble = reward(prompt, images=list(images), noise_levels=ensemble_levels).rewards
    per_level = []
    for i, level in enumerate(levels):
        step(2 + i, f"scoring at u={level:g}")
        per_level.append(reward(prompt, images=list(images), noise_level=level).rewards)
    ranking = ensemble if rank_by_ensemble else out.rewards
    return ImageScores(
        rewards=out.rewards,
        scores=out.scores,
        noise_level=noise_level,
        sigma=out.sigmas[0].item(),
        ensemble=ensemble,
        ensemble_levels=ensemble_levels,
        levels=levels,
        per_level=torch.stack(per_level),
        order=ranking.argsort(descending=True).tolist(),
        rank_by_ensemble=rank_by_ensemble,
    )


@dataclass
class Candidate:
    """One generated candidate: decoded image, reward in latent space, the checker's verdict."""

    image: Image.Image
    reward: float
    complies: bool
    violations: tuple[str, ...]
    seed: int


def shapes_candidates(models: AppModels, prompt: str, n: int, seed: int = 0, generator=None) -> list[Candidate]:
    """`n` candidates of `prompt` from `generator` (default: the base generator), seeded `seed .. seed + n - 1`,
    ranked by DiNa-LRM in latent space (best first); decoded only for display and the checker."""
    if not models.is_shapes:
        raise ValueError("the Shapes world needs the shipped Shapes model (start the app without --model).")
    parse_prompt(prompt)  # a clear error for text outside the grammar
    generator = generator if generator is not None else models.generator
    repeated, latents = generate_candidates(generator, [prompt], n, seed=seed, batch=n)
    rewards = models.reward(prompt=repeated, latents=latents).rewards
    images = decode(generator, latents)
    verdicts = check_many(repeated, images)
    candidates = [
        Candidate(images[i], rewards[i].item(), verdicts[i].overall, tuple(verdicts[i].violations), seed + i)
        for i in range(n)
    ]
    return sorted(candidates, key=lambda c: c.reward, reverse=True)
