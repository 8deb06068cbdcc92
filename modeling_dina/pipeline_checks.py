"""Argument checks of [`DiNaRewardPipeline.__call__`]: each bad input is refused with a message naming it. The
family-dependent parts (text components, prompt widths and lengths, the pooled vector and the text mask, latent
geometry) come from the reward model's backbone family."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
import torch


class DiNaPipelineChecksMixin:
    """The input checks of [`DiNaRewardPipeline`] (a mixin; reads `self.reward_model`, `self.components`)."""

    @property
    def backbone_family(self):
        """The reward model's backbone class: its prompt encoding, VAE convention and size geometry."""
        return type(self.reward_model.backbone)

    def check_inputs(
        self,
        prompt,
        images,
        latents,
        prompt_embeds,
        pooled_prompt_embeds,
        noise,
        generator,
        batch_size,
        prompt_embeds_mask=None,
    ):
        """Validate the arguments of `__call__`; returns the number of items to score."""
        if (images is None) == (latents is None):
            raise ValueError("pass exactly one of `images` and `latents`.")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of `prompt` and `prompt_embeds`.")
        self._check_embeds_given(prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"`generator` must be one torch.Generator, got {type(generator).__name__}.")
        num = len(images) if images is not None else self._check_latents(latents)
        if num == 0:
            raise ValueError("`images` is empty: nothing to score.")
        if prompt is not None:
            self._check_prompt(prompt, num)
        else:
            self._check_embeds(prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask, num)
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

    def _check_embeds_given(self, prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask) -> None:
        """Which prompt-embedding arguments go together, for this family."""
        family = self.backbone_family
        if prompt_embeds is None and (pooled_prompt_embeds is not None or prompt_embeds_mask is not None):
            given = "pooled_prompt_embeds" if pooled_prompt_embeds is not None else "prompt_embeds_mask"
            raise ValueError(f"`{given}` is given without `prompt_embeds`.")
        if family.uses_pooled and prompt_embeds is not None and pooled_prompt_embeds is None:
            raise ValueError("`pooled_prompt_embeds` is required with `prompt_embeds`.")
        if not family.uses_pooled and pooled_prompt_embeds is not None:
            raise ValueError(f"the {family.family} reward model reads no pooled prompt embedding: drop it.")
        if not family.uses_text_mask and prompt_embeds_mask is not None:
            raise ValueError(
                f"the {family.family} reward model attends to every prompt token: it takes no `prompt_embeds_mask`."
            )

    def _check_prompt(self, prompt, num: int) -> None:
        if isinstance(prompt, str):
            pass
        elif not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
            raise TypeError("`prompt` must be a string or a list of strings.")
        elif len(prompt) != num:
            raise ValueError(f"`prompt` has {len(prompt)} prompts for {num} items: give one, or one per item.")
        missing = [name for name in self.backbone_family.text_components if self.components.get(name) is None]
        if missing:
            raise ValueError(f"`prompt` needs the text encoders and tokenizers; missing {missing}.")

    def _check_latents(self, latents) -> int:
        backbone = self.reward_model.backbone
        if isinstance(latents, torch.Tensor) and latents.ndim == 3 and backbone.packed_latents:
            raise ValueError(
                f"`latents` of shape {tuple(latents.shape)} look packed, as `{backbone.pipeline_class}"
                '(output_type="latent")` returns them: unpack them with `pipe.unpack_latents(latents, height, width)`.'
            )
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"`latents` must be a (B, C, H, W) tensor of clean VAE latents, got {shape}.")
        if latents.shape[1] != backbone.latent_channels:
            raise ValueError(
                f"`latents` have {latents.shape[1]} channels; the reward model reads {backbone.latent_channels}."
            )
        patch = backbone.patch_size
        max_side = backbone.max_patches * patch if backbone.max_patches else None
        height, width = latents.shape[-2:]
        if height % patch or width % patch or min(height, width) < patch or max(height, width) > (max_side or height):
            bound = f"[{patch}, {max_side}] (the transformer's position table)" if max_side else f">= {patch}"
            raise ValueError(
                f"`latents` are {height}x{width}; sides must be multiples of the patch size {patch} in {bound}."
            )
        if not latents.is_floating_point() or not torch.isfinite(latents).all():
            raise ValueError("`latents` must be finite floating-point values (found NaN, inf or integers).")
        return latents.shape[0]

    def _check_embeds(self, prompt_embeds, pooled_prompt_embeds, prompt_embeds_mask, num: int) -> None:
        family = self.backbone_family
        text_width, pooled_width = family.prompt_widths(self.reward_model.config.backbone_config or {})
        arguments = [("prompt_embeds", prompt_embeds, 3, text_width)]
        if pooled_prompt_embeds is not None:
            arguments.append(("pooled_prompt_embeds", pooled_prompt_embeds, 2, pooled_width))
        if prompt_embeds_mask is not None:
            arguments.append(("prompt_embeds_mask", prompt_embeds_mask, 2, None))
        for arg, value, ndim, width in arguments:
            if not isinstance(value, torch.Tensor) or value.ndim != ndim:
                raise ValueError(f"`{arg}` must be a {ndim}-D tensor.")
            if value.shape[0] not in (1, num):
                raise ValueError(f"`{arg}` has {value.shape[0]} rows for {num} items: give one, or one per item.")
            if width is not None and value.shape[-1] != width:
                raise ValueError(f"`{arg}` has width {value.shape[-1]}; the reward model expects {width}.")
        if prompt_embeds_mask is not None:
            if prompt_embeds_mask.is_floating_point():
                raise ValueError(
                    "`prompt_embeds_mask` must be bool or integer (1 for real tokens), not floating point."
                )
            if prompt_embeds_mask.shape[1] != prompt_embeds.shape[1]:
                raise ValueError(
                    f"`prompt_embeds_mask` covers {prompt_embeds_mask.shape[1]} tokens; `prompt_embeds` have "
                    f"{prompt_embeds.shape[1]}."
                )
        max_length = self.reward_model.config.max_sequence_length
        expected = family.prompt_length(self.components, max_length)
        if expected is not None and prompt_embeds.shape[1] != expected:
            warnings.warn(
                f"`prompt_embeds` have {prompt_embeds.shape[1]} tokens; the reward model was trained with {expected} "
                f"(`max_sequence_length={max_length}`).",
                stacklevel=4,
            )

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


__all__ = ["DiNaPipelineChecksMixin"]
