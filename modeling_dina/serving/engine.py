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

from ..backbone_base import PromptEmbeds
from ..image_processing_dina import as_image_list
from ..pipeline_dina import DiNaRewardPipeline
from .protocol import ImageRequest, LatentRequest, ModelSpec, RequestError, seeded_noise

WARMUP_SIDE = 2  # latent patches a side in the warm-up call


@dataclass
class ScoreItem:
    """One sample to score: CPU fp32 `latent (C, h, w)`, `noise` like it, `prompt_embeds (L, D)`, `pooled (P,)`
    where the family has one, bool `mask (L,)` where the family masks prompt tokens and the request gave one."""

    latent: torch.Tensor
    noise: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None
    noise_level: float
    mask: torch.Tensor | None = None

    @property
    def group(self) -> tuple:
        """Items of one group run in one backbone call: same latent size, noise level and prompt length, and the same
        optional tensors (an item without a mask reads every token; it is not batched with masked items)."""
        shapes = (tuple(self.latent.shape), tuple(self.prompt_embeds.shape))
        return (*shapes, self.noise_level, self.pooled is None, self.mask is None)


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
        self._prompts: OrderedDict[str, PromptEmbeds] = OrderedDict()
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
        """One call shaped as the image route's: the family's prompt length, pooled vector and mask."""
        spec, pipe = self.spec, self.pipe
        side = WARMUP_SIDE * spec.patch_size
        latent = torch.zeros(spec.latent_channels, side, side)
        max_length = pipe.reward_model.config.max_sequence_length
        tokens = pipe.backbone_family.prompt_length(pipe.components, max_length) or max_length
        pooled = torch.zeros(spec.pooled_width) if spec.uses_pooled else None
        mask = torch.ones(tokens, dtype=torch.bool) if spec.uses_mask else None
        embeds = torch.zeros(tokens, spec.text_width)
        self.score_group([ScoreItem(latent, torch.zeros_like(latent), embeds, pooled, 0.5, mask)])

    # ------------------------------------------------------------------------------------------------ requests

    def latent_items(self, request: LatentRequest) -> list[ScoreItem]:
        """One item per sample of a DRM request, each with its noise by the DRM v1 rule."""
        latents = request.latents
        if request.seeds is not None:
            noise = seeded_noise(latents, request.seeds)
        elif self.random_noise:
            noise = torch.randn(latents.shape, generator=self._noise_generator)
        else:
            noise = self.pipe.default_noise(
                latents,
                pooled_prompt_embeds=request.pooled_prompt_embeds,
                prompt_embeds=request.prompt_embeds,
                prompt_embeds_mask=request.encoder_attention_mask,
            ).cpu()
        pooled, mask = request.pooled_prompt_embeds, request.encoder_attention_mask
        return [
            ScoreItem(
                latents[i],
                noise[i],
                request.prompt_embeds[i],
                None if pooled is None else pooled[i],
                float(u),
                None if mask is None else mask[i],
            )
            for i, u in enumerate(request.u.tolist())
        ]

    def image_items(self, request: ImageRequest) -> list[ScoreItem]:
        """Prompts (through the embedding cache) and images (VAE) -> items, noised as `pipe(prompt, images=...)`
        would noise them. Runs on the engine thread."""
        pipe = self.pipe
        level = pipe.reward_model.config.noise_level_images if request.noise_level is None else request.noise_level
        encoded = self.encode_prompts(request.prompts)
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
                items[i] = ScoreItem(
                    latents[row],
                    noise[row],
                    encoded.embeds[i],
                    None if encoded.pooled is None else encoded.pooled[i],
                    float(level),
                    None if encoded.mask is None else encoded.mask[i],
                )
        return items

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """CPU `PromptEmbeds` of `prompts` (`(N, L, D)`, pooled `(N, P)` / mask `(N, L)` as the family has them) by the
        pipeline's own `encode_prompts`; only prompts missing from the LRU cache reach the text encoders."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompts]
        if missing:
            self._check_text_encoders()
            with torch.no_grad():
                encoded = self.pipe.encode_prompts(missing)
            for i, prompt in enumerate(missing):
                self._prompts[prompt] = PromptEmbeds(
                    encoded.embeds[i].float().cpu(),
                    None if encoded.pooled is None else encoded.pooled[i].float().cpu(),
                    None if encoded.mask is None else encoded.mask[i].cpu(),
                )
        for prompt in prompts:
            self._prompts.move_to_end(prompt)
        rows = [self._prompts[p] for p in prompts]
        while len(self._prompts) > self.prompt_cache_size:
            self._prompts.popitem(last=False)
        return PromptEmbeds(*(_stacked([getattr(r, name) for r in rows]) for name in ("embeds", "pooled", "mask")))

    def _check_text_encoders(self) -> None:
        """A model served without its text encoders (e.g. a Qwen-Image folder whose Qwen2.5-VL is left out) scores
        prompt embeddings only: the image route says so instead of failing inside the encoder."""
        family = self.pipe.backbone_family
        missing = [name for name in family.text_components if self.pipe.components.get(name) is None]
        if missing:
            raise RequestError(
                "prompts",
                f"this server's model has no text encoders ({', '.join(missing)} missing): send the prompt encoding "
                "to DRM v1 `POST /v1/score` instead.",
                501,
            )

    @property
    def cached_prompts(self) -> int:
        return len(self._prompts)

    # ------------------------------------------------------------------------------------------------ scoring

    def score_group(self, items: list[ScoreItem]) -> list[float]:
        """Raw rewards of items of one group (see `ScoreItem.group`), in one call of the model's scoring function."""
        device = self.pipe._execution_device

        def stacked(name: str) -> torch.Tensor | None:
            value = _stacked([getattr(item, name) for item in items])
            return None if value is None else value.to(device)

        with torch.no_grad():
            out = self.pipe.reward_model.score_clean(
                stacked("latent"),
                stacked("prompt_embeds"),
                stacked("pooled"),
                stacked("mask"),
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


def _stacked(rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Rows of one group's optional tensor (all given or all `None`, see `ScoreItem.group`) as one batch."""
    return None if rows[0] is None else torch.stack(rows)


__all__ = ["RewardEngine", "ScoreItem"]
