"""`DiNaRewardPipeline`: score images or generator latents against prompts with DiNa-LRM.

    pipe = DiNaRewardPipeline.from_pretrained("path/or/hub-id-of-a-DiNa-model")
    out = pipe("a red circle", images=["a.png", "b.png"])
    out.rewards

Image sizes: every image is scored at a size whose sides are multiples of `vae_scale_factor * patch_size` pixels
(16 for SD3) and at most `pos_embed_max_size * patch_size * vae_scale_factor` pixels (6144 for SD3.5-M, the
transformer's position table). A larger image is downscaled so its longer side fits (aspect ratio kept); then each side
is rounded down to the multiple (a bicubic, antialiased resize; sizes already valid are not touched). An image whose
shorter side ends up below one patch is an error.

Noise: one Gaussian draw per (prompt, image size) group, so images of the same prompt and size see the same noise
(common random numbers, SPEC §1) and score differences reflect the images. Without `generator` or `noise` the draw is
seeded from the prompt and size, so a reward does not depend on the rest of the batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .image_processing_dina import DiNaImageProcessor, as_image_list, vae_encode
from .losses import preference_probability, thurstone_variance
from .modeling_dina import DiNaRewardModel
from .noise import NoiseGrid
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


class DiNaRewardPipeline(DiNaPipelineLoaderMixin, DiffusionPipeline):
    r"""
    Scores (prompt, image) or (prompt, latent) pairs with a [`DiNaRewardModel`]: the SD3 prompt encoding (no
    classifier-free guidance), the SD3 VAE for images, noise at a snapped level of the base's training grid, then the
    reward model.

    Args:
        reward_model ([`DiNaRewardModel`]): the reward model.
        scheduler ([`FlowMatchEulerDiscreteScheduler`], *optional*): the base's scheduler, shared and saved with the
            pipeline; a warning tells when its training grid is not the reward model's (where noise levels snap).
        vae ([`AutoencoderKL`], *optional*): the base's VAE, needed for `images` (kept in fp32 by `from_pretrained`).
        text_encoder, text_encoder_2 ([`CLIPTextModelWithProjection`], *optional*), text_encoder_3
            ([`T5EncoderModel`], *optional*) and their tokenizers: the SD3 text encoders, needed for `prompt`.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->vae->reward_model"
    _optional_components = ["scheduler", "vae", *TEXT_COMPONENTS]

    # SD3's own prompt encoding, borrowed as is: CLIP-L + CLIP-G penultimate states zero-padded to the T5 width, then
    # the T5 states on the sequence axis; pooled = both CLIPs' projections (SPEC §4).
    encode_prompt = StableDiffusion3Pipeline.encode_prompt
    _get_clip_prompt_embeds = StableDiffusion3Pipeline._get_clip_prompt_embeds
    _get_t5_prompt_embeds = StableDiffusion3Pipeline._get_t5_prompt_embeds

    def __init__(
        self,
        reward_model: DiNaRewardModel,
        scheduler: FlowMatchEulerDiscreteScheduler | None = None,
        vae: AutoencoderKL | None = None,
        text_encoder: CLIPTextModelWithProjection | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder_2: CLIPTextModelWithProjection | None = None,
        tokenizer_2: CLIPTokenizer | None = None,
        text_encoder_3: T5EncoderModel | None = None,
        tokenizer_3: T5TokenizerFast | None = None,
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
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
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

    def check_inputs(self, prompt, images, latents, prompt_embeds, pooled_prompt_embeds, noise, generator, batch_size):
        """Validate the arguments of `__call__`; returns the number of items to score."""
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of `images` and `latents`.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`.")
        if prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`pooled_prompt_embeds` is required with `prompt_embeds`.")
        if prompt_embeds is None and pooled_prompt_embeds is not None:
            raise ValueError("`pooled_prompt_embeds` is given without `prompt_embeds`.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be one torch.Generator, got {type(generator).__name__}.")
        num = len(images) if images is not None else self._check_latents(latents)
        if num == 0:
            raise ValueError("`images` is empty: nothing to score.")
        if prompt is not None:
            if isinstance(prompt, str):
                pass
            elif not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise TypeError("`prompt` must be a string or a list of strings.")
            elif len(prompt) != num:
                raise ValueError(f"`prompt` has {len(prompt)} prompts for {num} items: give one, or one per item.")
            if any(self.components[name] is None for name in TEXT_COMPONENTS):
                missing = [name for name in TEXT_COMPONENTS if self.components[name] is None]
                raise ValueError(f"`prompt` needs the text encoders and tokenizers; missing {missing}.")
        else:
            self._check_embeds(prompt_embeds, pooled_prompt_embeds, num)
        if images is not None and self.vae is None:
            raise ValueError("`images` needs a `vae`; this pipeline has none (score `latents` instead).")
        if noise is not None:
            if not isinstance(noise, torch.Tensor) or noise.ndim != 4 or noise.shape[0] != num:
                raise ValueError(f"`noise` must be a (B, C, H, W) tensor with B = {num}, one draw per item.")
            if latents is not None and noise.shape != latents.shape:
                raise ValueError(f"`noise` has shape {tuple(noise.shape)}, `latents` {tuple(latents.shape)}.")
            if not torch.isfinite(noise).all():
                raise ValueError("`noise` contains NaN or infinite values.")
        return num

    def _check_latents(self, latents) -> int:
        backbone = self.reward_model.backbone
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a (B, C, H, W) tensor of clean VAE latents, got {shape}.")
        if latents.shape[1] != backbone.latent_channels:
            raise ValueError(
                f"`latents` have {latents.shape[1]} channels; the reward model reads {backbone.latent_channels}."
            )
        patch, max_side = backbone.patch_size, backbone.max_patches * backbone.patch_size
        height, width = latents.shape[-2:]
        if height % patch or width % patch or max(height, width) > max_side or min(height, width) < patch:
            raise ValueError(
                f"`latents` are {height}x{width}; sides must be multiples of the patch size {patch} in [{patch}, "
                f"{max_side}] (the transformer's position table)."
            )
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError("`latents` must be finite floating-point values (found NaN, inf or integers).")
        return latents.shape[0]

    def _check_embeds(self, prompt_embeds, pooled_prompt_embeds, num: int) -> None:
        backbone_config = self.reward_model.config.backbone_config or {}
        for arg, value, ndim, width in (
            ("prompt_embeds", prompt_embeds, 3, backbone_config.get("joint_attention_dim")),
            ("pooled_prompt_embeds", pooled_prompt_embeds, 2, backbone_config.get("pooled_projection_dim")),
        ):
            if not isinstance(value, torch.Tensor) or value.ndim != ndim:
                raise ValueError(f"`{arg}` must be a {ndim}-D tensor.")
            if value.shape[0] not in (1, num):
                raise ValueError(f"`{arg}` has {value.shape[0]} rows for {num} items: give one, or one per item.")
            if width is not None and value.shape[-1] != width:
                raise ValueError(f"`{arg}` has width {value.shape[-1]}; the reward model expects {width}.")
        if self.tokenizer is None:  # the CLIP length is unknown without it
            return
        expected = self.tokenizer_max_length + self.reward_model.config.max_sequence_length  # CLIP, then T5 tokens
        if prompt_embeds.shape[1] != expected:
            warnings.warn(
                f"`prompt_embeds` have {prompt_embeds.shape[1]} tokens; the reward model was trained with {expected} "
                f"(T5 `max_sequence_length={self.reward_model.config.max_sequence_length}`).",
                stacklevel=4,
            )

    def _noise_levels(self, noise_level, noise_levels, images_given: bool) -> tuple[list[float], bool]:
        """The requested levels and whether they form an ensemble; each one checked, naming its argument."""
        if noise_level is not None and noise_levels is not None:
            raise ValueError("pass at most one of `noise_level` and `noise_levels`.")
        if noise_levels is not None:
            levels = noise_levels.tolist() if isinstance(noise_levels, (torch.Tensor, np.ndarray)) else noise_levels
            if not isinstance(levels, (list, tuple)):
                raise TypeError(f"`noise_levels` must be a list of floats, got {type(noise_levels).__name__}.")
            if not levels:
                raise ValueError("`noise_levels` is empty: give at least one noise level for the ensemble.")
            arg, ensemble = "noise_levels", True
        else:
            config = self.reward_model.config
            default = config.noise_level_images if images_given else config.noise_level_latents
            levels, arg, ensemble = [default if noise_level is None else noise_level], "noise_level", False
        for level in levels:
            if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0.0 <= level <= 1.0:
                raise ValueError(f"`{arg}` must lie in [0, 1], got {level!r}.")
        return [float(level) for level in levels], ensemble

    def _prompt_groups(self, prompt, prompt_embeds, pooled_prompt_embeds, num, device):
        """Embeddings once per distinct prompt: `(embeds, pooled, group of each item, key of each group)`."""
        if prompt is not None:
            prompts = [prompt] * num if isinstance(prompt, str) else list(prompt)
            keys = list(dict.fromkeys(prompts))
            index = {p: i for i, p in enumerate(keys)}
            with torch.no_grad():  # the text encoders are frozen: no graph even in differentiable mode
                embeds, _, pooled, _ = self.encode_prompt(
                    keys,
                    None,
                    None,
                    device=device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.reward_model.config.max_sequence_length,
                )
            return embeds, pooled, [index[p] for p in prompts], keys
        embeds = prompt_embeds.to(device).expand(num, -1, -1)
        pooled = pooled_prompt_embeds.to(device).expand(num, -1)
        # Items with equal pooled embeddings share a prompt (and so a noise draw); groups numbered by first appearance.
        _, inverse = torch.unique(pooled.detach().float(), dim=0, return_inverse=True)
        first = {}
        groups = [first.setdefault(g, len(first)) for g in inverse.tolist()]
        return embeds, pooled, groups, [f"<prompt_embeds {g}>" for g in range(len(first))]

    def _size_groups(self, images) -> dict[tuple[int, int], list[int]]:
        """Image indices grouped by the size they are scored at (see the module docstring), in order of appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        processor = self.image_processor
        for i, image in enumerate(images):
            size = processor.scoring_size(*processor.size_of(image, f"images[{i}]"), f"images[{i}]")
            groups.setdefault(size, []).append(i)
        return groups

    def _check_image_noise(self, noise, size_groups) -> None:
        if noise is None:
            return
        if len(size_groups) > 1:
            raise ValueError("`noise` needs all images scored at one size; these are grouped into several.")
        height, width = next(iter(size_groups))
        shape = (
            self.reward_model.backbone.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if tuple(noise.shape[1:]) != shape:
            raise ValueError(f"`noise` has shape {tuple(noise.shape[1:])} per item; the images' latents are {shape}.")

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
        return vae_encode(self.vae, pixels, sample_posterior=sample_posterior, generator=generator)

    def default_noise(self, latents: torch.Tensor, prompt=None, pooled_prompt_embeds=None) -> torch.Tensor:
        """The noise `__call__` draws for clean `latents` `(B, C, H, W)` given neither `noise` nor `generator`: one
        seeded draw per (prompt, size) group, prompts given as text (`prompt`) or by their `pooled_prompt_embeds`.
        Passing it as `noise=` scores a batch exactly as its items would be scored alone."""
        num, shape = latents.shape[0], tuple(latents.shape[1:])
        if prompt is not None:
            keys = [prompt] * num if isinstance(prompt, str) else list(prompt)
        else:
            pooled = pooled_prompt_embeds.expand(num, -1)
            _, _, groups, group_keys = self._prompt_groups(None, pooled[:, None], pooled, num, latents.device)
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
            latents (`torch.Tensor` of shape `(B, C, H, W)`): clean VAE latents, already shifted and scaled (as
                `StableDiffusion3Pipeline(output_type="latent")` returns them).
            prompt_embeds (`torch.Tensor` of shape `(B or 1, L, D)`), pooled_prompt_embeds (`(B or 1, D_pooled)`):
                the SD3 prompt encoding, instead of `prompt` (encode with the reward's `max_sequence_length`).
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
            prompt, images, latents, prompt_embeds, pooled_prompt_embeds, noise, generator, batch_size
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
            embeds, pooled, prompt_group, group_keys = self._prompt_groups(
                prompt, prompt_embeds, pooled_prompt_embeds, num, device
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
                    out = self.reward_model.score_clean(clean, embeds[rows], pooled[rows], noise=eps, **levels_arg)
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
