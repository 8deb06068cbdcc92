"""`RewardEngine`: a loaded DiNa pipeline turned into scorable items, and the one call that scores a group of them.

The engine owns every use of the model: the app and the batchers hand it work through its single worker thread
(`engine.executor`), so requests never race on the model. An item is one sample: a clean latent, its prompt encoding,
a noise level and its own noise draw, so a batch's rewards do not depend on which requests share it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..image_processing_dina import as_image_list
from ..pipeline_dina import DiNaRewardPipeline
from .protocol import ImageRequest, LatentRequest, ModelSpec, seeded_noise

WARMUP_SIDE = 2  # latent patches a side in the warm-up call


@dataclass
class ScoreItem:
    """One sample to score: CPU fp32 `latent (C, h, w)`, `noise` like it, `prompt_embeds (L, D)`, `pooled (P,)`."""

    latent: torch.Tensor
    noise: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    noise_level: float

    @property
    def group(self) -> tuple:
        """Items of one group run in one backbone call: same latent size, noise level and prompt length."""
        return (tuple(self.latent.shape), self.noise_level, tuple(self.prompt_embeds.shape))


class RewardEngine:
    """Loads a DiNa model for serving and scores `ScoreItem`s.

    Args:
        model: a DiNa model folder or Hub id (`DiNaRewardPipeline.from_pretrained`).
        device, dtype: where and in which precision the reward model runs (the VAE stays fp32).
        fuse: fold the reward LoRA into the weights (the model only scores here).
        compile: `torch.compile` the kept blocks and the head (`DiNaRewardModel.compile_regions`).
        random_noise: a fresh noise draw per request without `seeds` (instead of the deterministic default).
        prompt_cache_size: prompts whose embeddings are kept (least recently used are dropped).
    """

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        fuse: bool = True,
        compile: bool = False,
        random_noise: bool = False,
        prompt_cache_size: int = 1024,
    ):
        self.model_name, self.device, self.dtype = model, device, dtype
        self.fuse, self.compile, self.random_noise = fuse, compile, random_noise
        self.prompt_cache_size = prompt_cache_size
        self.pipe: DiNaRewardPipeline | None = None
        self.spec: ModelSpec | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dina-engine")
        self._prompts: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._noise_generator = torch.Generator().manual_seed(torch.seed())

    # ------------------------------------------------------------------------------------------------ loading

    def load(self) -> None:
        """Load, optionally fuse and compile, warm up; `ready` is set only when the model has scored once."""
        try:
            dtype = getattr(torch, self.dtype) if isinstance(self.dtype, str) else self.dtype
            pipe = DiNaRewardPipeline.from_pretrained(self.model_name, dtype=dtype)
            if self.device is not None:
                pipe = pipe.to(self.device)
            pipe.set_progress_bar_config(disable=True)
            model = pipe.reward_model.eval()
            if self.fuse and model.config.use_lora:
                model.fuse_reward_lora()
            if self.compile:
                model.compile_regions()
            self.pipe, self.spec = pipe, ModelSpec.from_model(model)
            self._warm_up()
        except BaseException as err:
            self.load_error = err
            raise
        self.ready.set()

    def _warm_up(self) -> None:
        side = WARMUP_SIDE * self.spec.patch_size
        latent = torch.zeros(self.spec.latent_channels, side, side)
        tokens = self.pipe.tokenizer_max_length + self.pipe.reward_model.config.max_sequence_length
        embeds = torch.zeros(tokens, self.spec.text_width)
        item = ScoreItem(latent, torch.zeros_like(latent), embeds, torch.zeros(self.spec.pooled_width), 0.5)
        self.score_group([item])

    # ------------------------------------------------------------------------------------------------ requests

    def latent_items(self, request: LatentRequest) -> list[ScoreItem]:
        """One item per sample of a DRM request, each with its noise by the DRM v1 rule."""
        latents = request.latents
        if request.seeds is not None:
            noise = seeded_noise(latents, request.seeds)
        elif self.random_noise:
            noise = torch.randn(latents.shape, generator=self._noise_generator)
        else:
            noise = self.pipe.default_noise(latents, pooled_prompt_embeds=request.pooled_prompt_embeds).cpu()
        return [
            ScoreItem(latents[i], noise[i], request.prompt_embeds[i], request.pooled_prompt_embeds[i], float(u))
            for i, u in enumerate(request.u.tolist())
        ]

    def image_items(self, request: ImageRequest) -> list[ScoreItem]:
        """Prompts (through the embedding cache) and images (VAE) -> items, noised as `pipe(prompt, images=...)`
        would noise them. Runs on the engine thread."""
        pipe = self.pipe
        level = pipe.reward_model.config.noise_level_images if request.noise_level is None else request.noise_level
        embeds, pooled = self.encode_prompts(request.prompts)
        images = as_image_list(request.images)
        items: list[ScoreItem | None] = [None] * len(images)
        for size, indices in pipe._size_groups(images).items():
            with torch.no_grad():
                latents = pipe.encode_images([images[i] for i in indices], size=size)
            prompts = [request.prompts[i] for i in indices]
            if request.seeds is not None:
                noise = seeded_noise(latents, torch.tensor([request.seeds[i] for i in indices]))
            elif self.random_noise:
                noise = torch.randn(latents.shape, generator=self._noise_generator)
            else:
                noise = pipe.default_noise(latents, prompt=prompts)
            latents, noise = latents.cpu(), noise.cpu()
            for row, i in enumerate(indices):
                items[i] = ScoreItem(latents[row], noise[row], embeds[i], pooled[i], float(level))
        return items

    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`(N, L, D)`, `(N, P)` CPU embeddings; only prompts missing from the LRU cache reach the text encoders."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompts]
        if missing:
            with torch.no_grad():
                embeds, _, pooled, _ = self.pipe.encode_prompt(
                    missing,
                    None,
                    None,
                    device=self.pipe._execution_device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.pipe.reward_model.config.max_sequence_length,
                )
            for i, prompt in enumerate(missing):
                self._prompts[prompt] = (embeds[i].float().cpu(), pooled[i].float().cpu())
        for prompt in prompts:
            self._prompts.move_to_end(prompt)
        rows = [self._prompts[p] for p in prompts]
        while len(self._prompts) > self.prompt_cache_size:
            self._prompts.popitem(last=False)
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    @property
    def cached_prompts(self) -> int:
        return len(self._prompts)

    # ------------------------------------------------------------------------------------------------ scoring

    def score_group(self, items: list[ScoreItem]) -> list[float]:
        """Raw rewards of items of one group (see `ScoreItem.group`), in one call of the model's scoring function."""
        device = self.pipe._execution_device

        def stacked(name: str) -> torch.Tensor:
            return torch.stack([getattr(item, name) for item in items]).to(device)

        with torch.no_grad():
            out = self.pipe.reward_model.score_clean(
                stacked("latent"),
                stacked("prompt_embeds"),
                stacked("pooled"),
                noise=stacked("noise"),
                noise_level=items[0].noise_level,
            )
        return out.rewards.cpu().tolist()

    def score_items(self, items: list[ScoreItem], max_batch_size: int) -> list[float | BaseException]:
        """Score any items: grouped (`ScoreItem.group`), at most `max_batch_size` per call. When a call fails, its
        items are retried one by one, so a bad item fails alone and its batch-mates still get their rewards."""
        results: list[float | BaseException | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(item.group, []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), max_batch_size):
                chunk = indices[start : start + max_batch_size]
                try:
                    for i, reward in zip(chunk, self.score_group([items[i] for i in chunk])):
                        results[i] = reward
                except Exception:
                    for i in chunk:
                        try:
                            results[i] = self.score_group([items[i]])[0]
                        except Exception as err:
                            results[i] = err
        return results

    def close(self) -> None:
        self.executor.shutdown(wait=True)


__all__ = ["RewardEngine", "ScoreItem"]
