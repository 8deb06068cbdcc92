"""`DiNaRewardPipeline`: score images or generator latents against prompts with DiNa-LRM.

    pipe = DiNaRewardPipeline.from_pretrained("path/or/hub-id-of-a-DiNa-model")
    out = pipe("a red circle", images=["a.png", "b.png"])
    out.rewards

Families: the reward model's backbone family (SD3, FLUX.1, Qwen-Image, Z-Image) decides the prompt encoding (its base
pipeline's own `encode_prompt`), the VAE convention and the size geometry; the pipeline code is the same for all.

Image sizes: every image is scored at a size whose sides are multiples of `vae_scale_factor * patch_size` pixels
(16 for every family) and at most `max_patches * patch_size * vae_scale_factor` pixels (6144 for SD3.5-M, the
transformer's position table; FLUX's rotary positions are unbounded). A larger image is downscaled so its longer side
fits (aspect ratio kept); then each side is rounded down to the multiple (a bicubic, antialiased resize; sizes already
valid are not touched). An image whose shorter side ends up below one patch is an error.

Noise: one Gaussian draw per (prompt, image size) group, so images of the same prompt and size see the same noise
(common random numbers, SPEC §1) and score differences reflect the images. Without `generator` or `noise` the draw is
seeded from the prompt and size, so a reward does not depend on the rest of the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .backbone_base import PromptEmbeds
from .image_processing_dina import DiNaImageProcessor, as_image_list
from .losses import preference_probability, thurstone_variance
from .modeling_dina import DiNaRewardModel
from .noise import NoiseGrid
from .pipeline_checks import DiNaPipelineChecksMixin
from .pipeline_loading import TEXT_COMPONENTS, DiNaPipelineLoaderMixin

DEFAULT_SEED = 0


@dataclass
class DiNaRewardPipelineOutput(BaseOutput):
    """
    Args:
        rewards (`torch.Tensor` of shape `(batch_size,)`): raw rewards, in input order.
        scores (`torch.Tensor` of shape `(batch_size,)`): the released normalisation `(raw + offset) / scale`.
        sigmas (`torch.Tensor` of shape `(num_levels,)`): the snapped noise level(s) actually used.
        timesteps (`torch.Tensor` of shape `(num_levels,)`): the matching transformer timesteps (`sigma * 1000`).
    """

    rewards: torch.Tensor
    scores: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor


class DiNaRewardPipeline(DiNaPipelineLoaderMixin, DiNaPipelineChecksMixin, DiffusionPipeline):
    r"""
    Scores (prompt, image) or (prompt, latent) pairs with a [`DiNaRewardModel`]: the prompt encoding of the reward
    model's base (no classifier-free guidance), the base's VAE for images, noise at a snapped level of the base's
    training grid, then the reward model.

    Args:
        reward_model ([`DiNaRewardModel`]): the reward model.
        scheduler ([`FlowMatchEulerDiscreteScheduler`], *optional*): the base's scheduler, shared and saved with the
            pipeline; a warning tells when its training grid is not the reward model's (where noise levels snap).
        vae (*optional*): the base's VAE (`AutoencoderKL`; `AutoencoderKLQwenImage` for Qwen-Image), needed for
            `images` (kept in fp32 by `from_pretrained`).
        text_encoder, tokenizer, text_encoder_2, tokenizer_2, text_encoder_3, tokenizer_3 (*optional*): the base's
            text encoders under its pipeline's names, needed for `prompt`: SD3 CLIP-L, CLIP-G, T5; FLUX.1 CLIP-L, T5;
            Qwen-Image Qwen2.5-VL; Z-Image Qwen3 (the backbone's `text_components` say which).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->vae->reward_model"
    _optional_components = ["scheduler", "vae", *TEXT_COMPONENTS]

    def __init__(
        self,
        reward_model: DiNaRewardModel,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae: ModelMixin | None = None,
        text_encoder: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        text_encoder_2: PreTrainedModel | None = None,
        tokenizer_2: PreTrainedTokenizerBase | None = None,
        text_encoder_3: PreTrainedModel | None = None,
        tokenizer_3: PreTrainedTokenizerBase | None = None,
    ):
        super().__init__()
        if not isinstance(reward_model, DiNaRewardModel):
            raise TypeError(f"`reward_model` must be a DiNaRewardModel, got {type(reward_model).__name__}.")
        self.register_modules(
            reward_model=reward_model,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
        )
        family = type(reward_model.backbone)
        self.vae_scale_factor = family.vae_scale_factor(vae) if vae is not None else 8
        self.image_processor = DiNaImageProcessor.from_backbone(reward_model.backbone, self.vae_scale_factor)
        self.tokenizer_max_length = tokenizer.model_max_length if tokenizer is not None else 77
        if scheduler is not None:
            # A fresh scheduler's sigmas (SPEC §1), even if a generator called `set_timesteps` on the shared one.
            grid = NoiseGrid.from_scheduler_config(dict(scheduler.config)).sigmas
            trained = reward_model.noise_grid.sigmas
            if grid.shape != trained.shape or not torch.allclose(grid, trained):
                warnings.warn(
                    "the scheduler's training grid differs from the reward model's (`config.scheduler_config`); "
                    "noise levels snap to the reward model's grid, the one it was trained on.",
                    stacklevel=2,
                )

    @property
    def noise_grid(self) -> NoiseGrid:
        """Where noise levels snap: the reward model's training grid."""
        return self.reward_model.noise_grid

    # ------------------------------------------------------------------------------------------------- scoring

    def encode_prompt(self, *args, **kwargs):
        """The base pipeline's own `encode_prompt` (`StableDiffusion3Pipeline`, `FluxPipeline`, `QwenImagePipeline` or
        `ZImagePipeline`, by the reward model's family) on this pipeline's text encoders: same arguments, same outputs.
        [`encode_prompts`] gives the encoding in the form the reward model reads."""
        return self.backbone_family.text_pipeline(self.components).encode_prompt(*args, **kwargs)

    def encode_prompts(self, prompts: list[str], device: torch.device | None = None) -> PromptEmbeds:
        """Prompts -> `PromptEmbeds(embeds, pooled, mask)` as the reward model reads them: the family's encoding (no
        classifier-free guidance) at the reward's `max_sequence_length`; `pooled` for SD3 and FLUX, `mask` (real
        tokens, padded to `max_sequence_length`) for Qwen-Image and Z-Image, else `None`."""
        return self.backbone_family.encode_prompt(
            self.components,
            list(prompts),
            max_sequence_length=self.reward_model.config.max_sequence_length,
            device=device if device is not None else self._execution_device,
        )

    def _prompt_groups(self, prompt, prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask, num, device):
        """Embeddings once per distinct prompt: `(PromptEmbeds, group of each item, key of each group)`."""
        if prompt is not None:
            prompts = [prompt] * num if isinstance(prompt, str) else list(prompt)
            keys = list(dict.fromkeys(prompts))
            index = {p: i for i, p in enumerate(keys)}
            with torch.no_grad():  # the text encoders are frozen: no graph even in differentiable mode
                encoded = self.encode_prompts(keys, device)
            return encoded, [index[p] for p in prompts], keys
        encoded = PromptEmbeds(
            embeds=prompt_embeds.to(device).expand(num, -1, -1),
            pooled=None if pooled_prompt_embeds is None else pooled_prompt_embeds.to(device).expand(num, -1),
            mask=None if prompt_embeds_mask is None else prompt_embeds_mask.to(device).bool().expand(num, -1),
        )
        # Items with equal embeddings share a prompt (and so a noise draw); groups numbered by first appearance. The
        # pooled vector tells prompts apart where there is one; else the real tokens' states.
        if encoded.pooled is not None:
            identity = encoded.pooled
        else:
            mask = encoded.mask if encoded.mask is not None else torch.ones_like(encoded.embeds[..., 0], dtype=bool)
            identity = (encoded.embeds * mask[..., None]).flatten(1)
        _, inverse = torch.unique(identity.detach().float(), dim=0, return_inverse=True)
        first = {}
        groups = [first.setdefault(g, len(first)) for g in inverse.tolist()]
        return encoded, groups, [f"<prompt_embeds {g}>" for g in range(len(first))]

    def _size_groups(self, images) -> dict[tuple[int, int], list[int]]:
        """Image indices grouped by the size they are scored at (see the module docstring), in order of appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        processor = self.image_processor
        for i, image in enumerate(images):
            size = processor.scoring_size(*processor.size_of(image, f"images[{i}]"), f"images[{i}]")
            groups.setdefault(size, []).append(i)
        return groups

    def encode_images(
        self,
        images,
        *,
        size: tuple[int, int] | None = None,
        sample_posterior: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Images (any kind `DiNaImageProcessor` reads) -> clean latents `(N, C, h, w)` in fp32: decoded, upright,
        alpha over white, fitted to `size` (default: each image's scoring size, which must then be one size), through
        the VAE (its mean, or a posterior sample with `sample_posterior`), shifted and scaled (SPEC §4). The training
        cache runs the same functions, so a file gives the same latents in both."""
        if self.vae is None:
            raise ValueError("`encode_images` needs a `vae`; this pipeline has none.")
        pixels = self.image_processor.preprocess_images(images, size)
        return self.backbone_family.encode_pixels(self.vae, pixels, sample_posterior, generator)

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents as the base's pipeline returns them with `output_type="latent"` for `height` x `width` images ->
        the `(B, C, h, w)` clean latents `__call__` reads. FLUX.1 and Qwen-Image return them packed 2x2
        (`(B, h/2 * w/2, 4C)`); SD3 and Z-Image latents are returned unchanged."""
        return self.backbone_family.unpack_latents(latents, height, width, self.vae_scale_factor)

    def default_noise(
        self, latents: torch.Tensor, prompt=None, pooled_prompt_embeds=None, prompt_embeds=None, prompt_embeds_mask=None
    ) -> torch.Tensor:
        """The noise `__call__` draws for clean `latents` `(B, C, H, W)` given neither `noise` nor `generator`: one
        seeded draw per (prompt, size) group, prompts given as text (`prompt`) or by their embeddings as `__call__`
        takes them (`pooled_prompt_embeds` suffices where the family has one; else `prompt_embeds`, with
        `prompt_embeds_mask` when given to `__call__`). Passing it as `noise=` scores a batch exactly as its items
        would be scored alone."""
        num, shape = latents.shape[0], tuple(latents.shape[1:])
        if prompt is not None:
            keys = [prompt] * num if isinstance(prompt, str) else list(prompt)
        else:
            if pooled_prompt_embeds is None and prompt_embeds is None:
                raise ValueError("`default_noise` needs `prompt`, `pooled_prompt_embeds` or `prompt_embeds`.")
            embeds = prompt_embeds if prompt_embeds is not None else pooled_prompt_embeds[:, None]
            _, groups, group_keys = self._prompt_groups(
                None, embeds, pooled_prompt_embeds, prompt_embeds_mask, num, latents.device
            )
            keys = [group_keys[g] for g in groups]
        return torch.cat([self._noise(key, shape, None, latents.device) for key in keys])

    def _noise(self, key: str, shape: tuple[int, ...], generator, device) -> torch.Tensor:
        """One `(1, C, H, W)` draw per (prompt, size) group: from `generator`, else seeded from the group's key."""
        if generator is None:
            seed = int.from_bytes(hashlib.sha256(f"{DEFAULT_SEED}|{key}|{shape}".encode()).digest()[:8], "little")
            # Drawn on the CPU, so the same group gets the same noise on every device.
            generator = torch.Generator().manual_seed(seed & (2**63 - 1))
        return randn_tensor((1, *shape), generator=generator, device=device, dtype=torch.float32)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images=None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        prompt_embeds_mask: torch.Tensor | None = None,
        noise_level: float | None = None,
        noise_levels: list[float] | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        batch_size: int = 8,
        sample_posterior: bool = False,
        differentiable: bool = False,
        return_dict: bool = True,
    ) -> DiNaRewardPipelineOutput | tuple:
        r"""
        Score images or latents against prompts.

        Args:
            prompt (`str` or `list[str]`): one prompt for all items, or one per item.
            images: a list of PIL images, file paths, numpy `(H, W, C)` arrays (uint8, uint16 or float in [0, 1]) or
                torch `(C, H, W)` tensors (float in [0, 1] or uint8); or one such image; or a batch as a numpy
                `(N, H, W, C)` array / torch `(N, C, H, W)` tensor. RGBA (composited on white), grayscale, palette and
                16-bit images are converted. Mixed sizes are fine (see the module docstring for the resize policy).
            latents (`torch.Tensor` of shape `(B, C, H, W)`): clean VAE latents, already normalised as the base's
                pipeline normalises them (as `StableDiffusion3Pipeline` and `ZImagePipeline` return them with
                `output_type="latent"`; `FluxPipeline` and `QwenImagePipeline` return them packed: unpack them first
                with [`unpack_latents`]).
            prompt_embeds (`torch.Tensor` of shape `(B or 1, L, D)`), pooled_prompt_embeds (`(B or 1, D_pooled)`),
                prompt_embeds_mask (`(B or 1, L)`, true for real tokens): the family's prompt encoding, instead of
                `prompt`, as [`encode_prompts`] gives it (pooled for SD3 and FLUX only; the mask for Qwen-Image and
                Z-Image, where `None` means every token is real). Encode with the reward's `max_sequence_length`.
            noise_level (`float`): the level in [0, 1], snapped to the training grid. Defaults to
                `config.noise_level_images` for images and `config.noise_level_latents` for latents.
            noise_levels (`list[float]`): run the noise ensemble of SPEC §3 over these levels instead.
            noise (`torch.Tensor` of shape `(B, C, H, W)`): the Gaussian draw to use (shared by ensemble levels).
            generator (`torch.Generator`): draws the noise (one draw per prompt and size, in order of appearance)
                and, with `sample_posterior`, the VAE samples. Without it, both are seeded.
            batch_size (`int`): items per VAE and reward-model call.
            sample_posterior (`bool`): sample the VAE posterior instead of taking its mean.
            differentiable (`bool`): keep the autograd graph, so rewards can be differentiated with respect to the
                latents (or tensor images) and the reward model's trainable weights. Default: `torch.no_grad`.
            return_dict (`bool`): return a [`DiNaRewardPipelineOutput`] rather than a tuple.
        """
        # 1. Check inputs
        levels, ensemble = self._noise_levels(noise_level, noise_levels, images is not None)
        if images is not None:
            images = as_image_list(images)
        num = self.check_inputs(
            prompt,
            images,
            latents,
            prompt_embeds,
            pooled_prompt_embeds,
            noise,
            generator,
            batch_size,
            prompt_embeds_mask,
        )
        if images is not None:
            size_groups = self._size_groups(images)
            self._check_image_noise(noise, size_groups)
        else:
            size_groups = {tuple(latents.shape[-2:]): list(range(num))}
        device = self._execution_device
        levels_arg = {"noise_levels": levels} if ensemble else {"noise_level": levels[0]}
        if sample_posterior and generator is None:
            posterior_generator = torch.Generator().manual_seed(DEFAULT_SEED)
        else:
            posterior_generator = generator

        with contextlib.nullcontext() if differentiable else torch.no_grad():
            # 2. Encode the prompt, once per distinct prompt
            encoded, prompt_group, group_keys = self._prompt_groups(
                prompt, prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask, num, device
            )
            batches = [
                (size, indices[start : start + batch_size])
                for size, indices in size_groups.items()
                for start in range(0, len(indices), batch_size)
            ]
            drawn: dict[tuple, torch.Tensor] = {}
            order, parts = [], []
            with self.progress_bar(total=len(batches)) as progress:
                for size, batch in batches:
                    # 3. Prepare clean latents: images grouped by the size they are scored at, latents as one group
                    if images is not None:
                        clean = self.encode_images(
                            [images[i] for i in batch],
                            size=size,
                            sample_posterior=sample_posterior,
                            generator=posterior_generator,
                        ).to(device)
                    else:
                        clean = latents[batch].to(device=device, dtype=torch.float32)
                    # 4. Noise: one draw per (prompt, size) group, the same for every ensemble level
                    if noise is not None:
                        eps = noise[batch]
                    else:
                        draws = []
                        for i in batch:
                            key = (group_keys[prompt_group[i]], tuple(clean.shape[1:]))
                            if key not in drawn:
                                drawn[key] = self._noise(key[0], key[1], generator, device)
                            draws.append(drawn[key])
                        eps = torch.cat(draws)
                    # 5. Score: snap, noise, one backbone call for every level, the head
                    rows = [prompt_group[i] for i in batch] if prompt is not None else batch
                    rows = torch.as_tensor(rows, device=device)
                    out = self.reward_model.score_clean(
                        clean,
                        encoded.embeds[rows],
                        None if encoded.pooled is None else encoded.pooled[rows],
                        None if encoded.mask is None else encoded.mask[rows],
                        noise=eps,
                        **levels_arg,
                    )
                    order.extend(batch)
                    parts.append(out.rewards)
                    progress.update()
            rewards = torch.cat(parts)[torch.as_tensor(order, device=device).argsort()]
            scores = self.reward_model.normalize(rewards)

        self.maybe_free_model_hooks()
        if not return_dict:
            return rewards, scores, out.sigmas, out.timesteps
        return DiNaRewardPipelineOutput(rewards=rewards, scores=scores, sigmas=out.sigmas, timesteps=out.timesteps)

    def compare(self, prompt, image_a, image_b, noise_level: float | None = None, **kwargs) -> float | torch.Tensor:
        """Calibrated `P(a > b)` of SPEC §2: `Phi((s_a - s_b) / sqrt(2 var(sigma) + eps))` at the sigma used.

        `image_a`/`image_b` are single images (returns a float) or equally long lists (returns a `(N,)` tensor);
        both sides of a pair see the same noise when they share prompt and size. `kwargs` go to `__call__`.
        """
        if "noise_levels" in kwargs:
            raise ValueError("`noise_levels` is not for `compare`: the calibrated variance is defined at one level.")
        single = not isinstance(image_a, (list, tuple))
        side_a = [image_a] if single else list(image_a)
        side_b = [image_b] if not isinstance(image_b, (list, tuple)) else list(image_b)
        if len(side_a) != len(side_b) or not side_a:
            raise ValueError(f"`image_a` and `image_b` must pair up: got {len(side_a)} and {len(side_b)} images.")
        prompts = prompt if isinstance(prompt, str) else list(prompt) * 2
        out = self(prompt=prompts, images=side_a + side_b, noise_level=noise_level, **kwargs)
        config = self.reward_model.config
        var = thurstone_variance(out.sigmas[0], config.variance_scale, config.variance_floor)
        n = len(side_a)
        p = preference_probability(out.rewards[:n], out.rewards[n:], var, var, config.loss_eps)
        return p.item() if single else p


__all__ = ["DiNaRewardPipeline", "DiNaRewardPipelineOutput"]
