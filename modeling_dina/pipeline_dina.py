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
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .configuration_dina import DiNaConfig
from .losses import preference_probability, thurstone_variance
from .modeling_dina import ADAPTER_NAME, DiNaRewardModel
from .noise import NoiseGrid, add_noise

DEFAULT_SEED = 0
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
# 16-bit images; older Pillow opens 16-bit PNGs as 32-bit mode "I" with the same 0..65535 range.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


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


class DiNaRewardPipeline(DiffusionPipeline):
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

    # ------------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> DiNaRewardPipeline:
        """Load from a DiNa model folder / Hub repo, or from a folder written by this pipeline's `save_pretrained`.

        For a DiNa model, the reward model is loaded with [`DiNaRewardModel.from_pretrained`] and the text encoders,
        tokenizers, VAE and scheduler come from the base named in its config (`base_model_name_or_path`). Pass any
        component (`vae=...`, `reward_model=...`) to use it instead, or `base_model="folder or id"` to read the base
        from elsewhere (e.g. a local copy). `dtype`/`torch_dtype` and `device_map` work as in diffusers; the VAE stays
        in fp32 unless a dict `dtype` names it.
        """
        name = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(name) and (
            os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
        ):
            raise FileNotFoundError(
                f"`pretrained_model_name_or_path` {name!r} is neither a folder nor a Hub repo id (`owner/name`)."
            )
        dtype = kwargs.pop("dtype", None)
        dtype = _component_dtypes(dtype if dtype is not None else kwargs.pop("torch_dtype", None))
        if dtype is not None:
            kwargs["dtype"] = dtype
        revision = kwargs.pop("revision", None)
        base_model = kwargs.pop("base_model", None)
        if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
            raise TypeError(
                "`base_model` must be a folder or Hub id here; to share a loaded generator use `from_pipe`."
            )
        base_model = os.fspath(base_model) if base_model is not None else None
        saved_pipeline = _is_pipeline_folder(name, revision)
        reward_model = kwargs.pop("reward_model", None)
        if reward_model is None:
            device_map = kwargs.get("device_map")
            reward_model = DiNaRewardModel.from_pretrained(
                name,
                subfolder="reward_model" if saved_pipeline else "",
                base_model=base_model,
                dtype=dtype.get("reward_model", dtype.get("default")) if dtype is not None else None,
                device_map=_accelerator() if device_map == "balanced" else device_map,
                revision=revision,
            )
        if saved_pipeline:
            return super().from_pretrained(name, reward_model=reward_model, revision=revision, **kwargs)
        # Where the reward model found its base (a relative base resolves against the model folder), else as named.
        base = base_model or reward_model.base_location or reward_model.config.base_model_name_or_path
        if not base:
            raise ValueError(
                f"the reward model {name!r} names no base (empty `base_model_name_or_path`): pass `base_model`."
            )
        pipe = super().from_pretrained(
            base, reward_model=reward_model, revision=reward_model.config.base_model_revision, **kwargs
        )
        pipe.register_to_config(_name_or_path=name)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, reward_model=None, **kwargs) -> DiNaRewardPipeline:
        """Share an SD3 generator's text encoders, tokenizers, VAE and scheduler (no copy) with a reward pipeline.

        Args:
            pipeline: a `StableDiffusion3Pipeline` (or any pipeline with the same components and a `transformer`).
            reward_model: a loaded [`DiNaRewardModel`], or a [`DiNaConfig`] / DiNa folder, built on
                `pipeline.transformer` so that the backbone's frozen blocks ARE the generator's (its own LoRA is
                switched on only while scoring, the generator's output is unchanged).
            kwargs: components to use instead of the generator's (e.g. `vae=...`).
        """
        # Not diffusers' `from_pipe`: it casts every component (shared with the generator!) to fp32 by default.
        if reward_model is None:
            raise ValueError("`reward_model` is required: a DiNaRewardModel, a DiNaConfig or a DiNa folder.")
        transformer = getattr(pipeline, "transformer", None)
        if isinstance(reward_model, (DiNaConfig, str, os.PathLike)):
            if transformer is None:
                raise ValueError("`pipeline` has no `transformer` to build the reward model on.")
            if any(ADAPTER_NAME in getattr(module, "lora_A", {}) for module in transformer.modules()):
                # A second build would silently replace the first reward model's LoRA in the shared blocks.
                raise ValueError(
                    "`pipeline.transformer` already carries a DiNa reward adapter: pass the DiNaRewardModel built on "
                    "it as `reward_model` instead of building another one."
                )
            if isinstance(reward_model, DiNaConfig):
                extra = {}
                if reward_model.scheduler_config is None and getattr(pipeline, "scheduler", None) is not None:
                    extra["scheduler_config"] = {k: v for k, v in pipeline.scheduler.config.items() if k[0] != "_"}
                reward_model = DiNaRewardModel.from_base(transformer, reward_model, **extra)
            else:
                reward_model = DiNaRewardModel.from_pretrained(reward_model, base_model=transformer)
            # LoRA and head follow the generator; for the shared blocks this is a no-op (same device and dtype).
            reward_model = reward_model.to(device=transformer.device, dtype=transformer.dtype).eval()
        elif not isinstance(reward_model, DiNaRewardModel):
            raise TypeError(
                f"`reward_model` must be a DiNaRewardModel, DiNaConfig or folder, got {type(reward_model).__name__}."
            )
        components = {name: getattr(pipeline, name, None) for name in ("scheduler", "vae", *TEXT_COMPONENTS)}
        unknown = sorted(set(kwargs) - set(components))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; components are {sorted(components)}.")
        pipe = cls(reward_model=reward_model, **{**components, **kwargs})
        if getattr(pipeline.config, "_name_or_path", None):
            pipe.register_to_config(_name_or_path=pipeline.config._name_or_path)
        return pipe

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

    def _size_groups(self, items) -> dict[tuple[int, int], list[int]]:
        """Item indices grouped by the size they are scored at (see the module docstring), in order of appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(self._target_size(*item.size, item.where), []).append(i)
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

    def _target_size(self, height: int, width: int, where: str) -> tuple[int, int]:
        backbone = self.reward_model.backbone
        multiple = self.vae_scale_factor * backbone.patch_size
        max_side = backbone.max_patches * multiple
        if min(height, width) < multiple:
            raise ValueError(
                f"`{where}` is {width}x{height} pixels, smaller than one latent patch ({multiple}x{multiple} pixels)."
            )
        scale = min(1.0, max_side / max(height, width))
        size = (math.floor(height * scale / multiple) * multiple, math.floor(width * scale / multiple) * multiple)
        if min(size) < multiple:
            raise ValueError(
                f"`{where}` is {width}x{height} pixels: fitting its longer side into {max_side} pixels leaves the "
                f"shorter below one latent patch ({multiple} pixels)."
            )
        return size

    def _encode_images(self, items, size, sample_posterior, generator, device) -> torch.Tensor:
        """Pixels -> clean VAE latents `(z - shift_factor) * scaling_factor` (SPEC §4), one batched VAE call."""
        pixels = []
        for item in items:
            image = item.pixels()
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
            pixels.append(image.clamp(0, 1))
        pixels = torch.stack(pixels).to(device=device, dtype=self.vae.dtype) * 2 - 1
        posterior = self.vae.encode(pixels).latent_dist
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        shift = self.vae.config.shift_factor or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

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
            images = _as_image_items(images)
        num = self.check_inputs(
            prompt, images, latents, prompt_embeds, pooled_prompt_embeds, noise, generator, batch_size
        )
        if images is not None:
            size_groups = self._size_groups(images)
            self._check_image_noise(noise, size_groups)
        else:
            size_groups = {tuple(latents.shape[-2:]): list(range(num))}
        device = self._execution_device
        dtype = self.reward_model.dtype
        sigmas, timesteps = self.noise_grid.snap(levels)
        grad_mode = contextlib.nullcontext() if differentiable else torch.no_grad()
        if sample_posterior and generator is None:
            posterior_generator = torch.Generator().manual_seed(DEFAULT_SEED)
        else:
            posterior_generator = generator

        with grad_mode:
            # 2. Encode the prompt, once per distinct prompt
            embeds, pooled, prompt_group, group_keys = self._prompt_groups(
                prompt, prompt_embeds, pooled_prompt_embeds, num, device
            )
            # 3. Prepare latents, batch by batch: images grouped by the size they are scored at, latents as one group
            batches = [
                (size, indices[start : start + batch_size])
                for size, indices in size_groups.items()
                for start in range(0, len(indices), batch_size)
            ]
            drawn: dict[tuple, torch.Tensor] = {}
            order, parts = [], []
            with self.progress_bar(total=len(batches)) as progress:
                for size, batch in batches:
                    if images is not None:
                        clean = self._encode_images(
                            [images[i] for i in batch], size, sample_posterior, posterior_generator, device
                        )
                    else:
                        clean = latents[batch].to(device=device, dtype=torch.float32)
                    # 4. Noise: one draw per (prompt, size) group, the same for every ensemble level
                    if noise is not None:
                        eps = noise[batch].to(device=device, dtype=torch.float32)
                    else:
                        draws = []
                        for i in batch:
                            key = (group_keys[prompt_group[i]], tuple(clean.shape[1:]))
                            if key not in drawn:
                                drawn[key] = self._noise(key[0], key[1], generator, device)
                            draws.append(drawn[key])
                        eps = torch.cat(draws)
                    noised = torch.stack([add_noise(clean, eps, sigma.item()) for sigma in sigmas]).to(dtype)
                    # 5. Score
                    rows = [prompt_group[i] for i in batch] if prompt is not None else batch
                    rows = torch.as_tensor(rows, device=device)
                    step = timesteps.to(device)
                    out = self.reward_model(
                        noised if ensemble else noised[0],
                        step if ensemble else step[0],
                        embeds[rows].to(dtype),
                        pooled[rows].to(dtype),
                    )
                    order.extend(batch)
                    parts.append(out.rewards.float())
                    progress.update()
            rewards = torch.cat(parts)[torch.as_tensor(order, device=device).argsort()]
            scores = self.reward_model.normalize(rewards)

        self.maybe_free_model_hooks()
        if not return_dict:
            return rewards, scores, sigmas, timesteps
        return DiNaRewardPipelineOutput(rewards=rewards, scores=scores, sigmas=sigmas, timesteps=timesteps)

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


# ----------------------------------------------------------------------------------------------------- images


class _ImageItem:
    """One input image: its size known up front (files are only opened for their header), pixels decoded on use."""

    def __init__(self, source, where: str):
        self.where = where
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"`{where}`: no such file {path!r}.")
            try:
                with PIL.Image.open(path) as image:
                    width, height = image.size
            except (PIL.UnidentifiedImageError, OSError) as err:
                raise ValueError(f"`{where}`: {path!r} is not a readable image ({err}).") from err
            self.source = path
        elif isinstance(source, PIL.Image.Image):
            width, height = source.size
            self.source = source
        elif isinstance(source, np.ndarray):
            self.source = _array_to_tensor(source, where)
            height, width = self.source.shape[-2:]
        elif isinstance(source, torch.Tensor):
            self.source = _tensor_to_rgb(source, where)
            height, width = self.source.shape[-2:]
        else:
            raise TypeError(
                f"`{where}` must be a PIL image, a file path, a numpy (H, W, C) array or a torch (C, H, W) tensor, "
                f"got {type(source).__name__}."
            )
        self.size = (int(height), int(width))

    def pixels(self) -> torch.Tensor:
        """`(3, H, W)` float RGB in [0, 1]."""
        if isinstance(self.source, torch.Tensor):
            return self.source
        try:
            if isinstance(self.source, str):
                with PIL.Image.open(self.source) as image:
                    return _pil_to_tensor(image, self.where)
            return _pil_to_tensor(self.source, self.where)
        except OSError as err:
            raise ValueError(f"`{self.where}`: the image could not be decoded ({err}).") from err


def _as_image_items(images) -> list[_ImageItem]:
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        images = list(images)  # a batch: NHWC numpy or NCHW torch
    elif not isinstance(images, (list, tuple)):
        images = [images]
    return [_ImageItem(image, f"images[{i}]") for i, image in enumerate(images)]


def _pil_to_tensor(image: PIL.Image.Image, where: str) -> torch.Tensor:
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image, dtype=np.float32) / 65535.0
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
    else:
        alpha = "A" in image.getbands() or "transparency" in image.info
        array = np.asarray(image.convert("RGBA" if alpha else "RGB"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return _tensor_to_rgb(tensor.movedim(-1, 0) if tensor.ndim == 3 else tensor, where)


def _array_to_tensor(array: np.ndarray, where: str) -> torch.Tensor:
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"`{where}`: a numpy image must be (H, W) or (H, W, C) with C in 1, 3, 4; got {array.shape}.")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        array = array.astype(np.float32) / 65535.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"`{where}`: numpy images must be uint8, uint16 or float in [0, 1], got {array.dtype}.")
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return _tensor_to_rgb(tensor.movedim(-1, 0) if tensor.ndim == 3 else tensor, where)


def _tensor_to_rgb(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """`(H, W)` or `(C, H, W)` with C in 1, 3, 4, uint8 or float in [0, 1] -> `(3, H, W)` float; alpha over white."""
    if tensor.ndim == 2:
        tensor = tensor[None]
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise ValueError(f"`{where}`: a tensor image must be (C, H, W), C in 1, 3, 4; got {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255.0
    elif not tensor.is_floating_point():
        raise TypeError(f"`{where}`: tensor images must be uint8 or float in [0, 1], got {tensor.dtype}.")
    else:
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{where}` contains NaN or infinite values.")
        low, high = tensor.min().item(), tensor.max().item()
        # A little slack for decoder round-off; a [-1, 1] or [0, 255] image is an error, not something to guess.
        if low < -0.01 or high > 1.01:
            raise ValueError(
                f"`{where}` has values in [{low:.3g}, {high:.3g}]; float images must lie in [0, 1] "
                "(map [-1, 1] images with (x + 1) / 2)."
            )
        tensor = tensor.clamp(0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    elif tensor.shape[0] == 4:
        rgb, alpha = tensor[:3], tensor[3:]
        tensor = rgb * alpha + (1 - alpha)
    return tensor


# ----------------------------------------------------------------------------------------------------- loading


def _component_dtypes(dtype):
    """A diffusers `dtype` argument with the VAE in fp32 unless named (precision of the latents matters)."""
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` {dtype!r} is not a torch dtype name (e.g. 'bfloat16').")
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        dtype = None
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {"vae": torch.float32, **dtype}
    return {"default": dtype, "vae": torch.float32}


def _is_pipeline_folder(name: str, revision: str | None) -> bool:
    """A folder written by a pipeline's `save_pretrained` (has `model_index.json`), as opposed to a DiNa model."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, "model_index.json"))
    try:
        hf_hub_download(name, "model_index.json", revision=revision)
    except EntryNotFoundError:
        return False
    return True


def _accelerator() -> torch.device | None:
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, 0) if accelerator is not None else None


__all__ = ["DiNaRewardPipeline", "DiNaRewardPipelineOutput"]
