"""Differentiable flow-matching sampling over a diffusers SD3 pipeline's transformer, and its generator LoRA.

The pipeline's `__call__` runs under `no_grad`; alignment needs the same computation with gradients, so the Euler
loop is written out here (it reproduces `StableDiffusion3Pipeline.__call__` with `output_type="latent"` exactly), plus
the stochastic (SDE) step of Flow-GRPO with its Gaussian transition log-probability.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file

from ..backbones import backbone_class, backbone_type_for

GENERATOR_ADAPTER = "generator"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default LoRA file name


@dataclass
class PromptEmbeddings:
    """Prompt encodings of a batch; the negative ones are set when classifier-free guidance is on."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None

    def repeat_interleave(self, repeats: int) -> PromptEmbeddings:
        """Each prompt's encodings `repeats` times in a row (a group of samples per prompt)."""
        return PromptEmbeddings(*(None if t is None else t.repeat_interleave(repeats, 0) for t in vars(self).values()))


@torch.no_grad()
def encode_prompts(
    pipe: StableDiffusion3Pipeline,
    prompts: list[str],
    *,
    guidance_scale: float,
    max_sequence_length: int,
    negative_prompt: str = "",
) -> PromptEmbeddings:
    """`pipe.encode_prompt` for a batch, with the negative prompt encoded when `guidance_scale > 1`."""
    cfg = guidance_scale > 1
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompt=prompts,
        prompt_2=None,
        prompt_3=None,
        device=pipe.transformer.device,
        do_classifier_free_guidance=cfg,
        negative_prompt=[negative_prompt] * len(prompts) if cfg else None,
        max_sequence_length=max_sequence_length,
    )
    return PromptEmbeddings(embeds, pooled, negative, negative_pooled)


def inference_schedule(
    pipe: StableDiffusion3Pipeline, num_inference_steps: int, latent_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's sampling schedule: `sigmas` (`num_inference_steps + 1` values, ending at 0) and the transformer
    `timesteps`, from a fresh copy of its scheduler (the pipeline's own is left untouched)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        patch = pipe.transformer.config.patch_size
        kwargs["mu"] = calculate_shift(
            (latent_shape[-2] // patch) * (latent_shape[-1] // patch),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    scheduler.set_timesteps(num_inference_steps, device=pipe.transformer.device, **kwargs)
    return scheduler.sigmas, scheduler.timesteps


def initial_latents(
    pipe: StableDiffusion3Pipeline, batch_size: int, height: int, width: int, generator: torch.Generator
) -> torch.Tensor:
    """Gaussian starting latents for `height x width` images, drawn on `generator`'s device, then moved to the
    transformer's device and dtype."""
    factor = pipe.vae_scale_factor
    multiple = factor * pipe.transformer.config.patch_size
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}.")
    shape = (batch_size, pipe.transformer.config.in_channels, height // factor, width // factor)
    noise = torch.randn(shape, generator=generator, device=generator.device)
    return noise.to(pipe.transformer.device, pipe.transformer.dtype)


def guided_velocity(
    transformer,
    latents: torch.Tensor,
    timestep: torch.Tensor,
    cond: PromptEmbeddings,
    guidance_scale: float,
    detach_unconditional: bool = False,
) -> torch.Tensor:
    """The transformer's velocity, with classifier-free guidance when `guidance_scale > 1` (as the SD3 pipeline);
    `timestep` is one value or one per sample. `detach_unconditional`: no gradient through the unconditional
    (negative-prompt) branch (same value)."""
    cfg = guidance_scale > 1
    timestep = timestep.expand(latents.shape[0])
    if cfg:
        timestep = timestep.repeat(2)
        if cond.negative_prompt_embeds is None:
            raise ValueError("guidance_scale > 1 needs negative prompt embeddings.")
        inputs = torch.cat([latents, latents])
        embeds = torch.cat([cond.negative_prompt_embeds, cond.prompt_embeds])
        pooled = torch.cat([cond.negative_pooled_prompt_embeds, cond.pooled_prompt_embeds])
    else:
        inputs, embeds, pooled = latents, cond.prompt_embeds, cond.pooled_prompt_embeds
    velocity = transformer(
        hidden_states=inputs,
        timestep=timestep,
        encoder_hidden_states=embeds,
        pooled_projections=pooled,
        return_dict=False,
    )[0]
    if not cfg:
        return velocity
    uncond, text = velocity.chunk(2)
    if detach_unconditional:
        uncond = uncond.detach()
    return uncond + guidance_scale * (text - uncond)


def euler_step(
    latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor | float
) -> torch.Tensor:
    """`FlowMatchEulerDiscreteScheduler.step`'s update `x + (sigma_next - sigma) * v`, with its float32 upcast.
    With `sigma_next = 0` it is the x0 prediction `x - sigma * v`."""
    return (latents.float() + (sigma_next - sigma) * velocity).to(velocity.dtype)


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    sigma_max: torch.Tensor,
    eta: float,
    *,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise_grid: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Euler-Maruyama step of the flow's reverse SDE (Flow-GRPO) and the Gaussian log-probability of the transition.

    With noise scale `std_t = eta * sqrt(sigma / (1 - sigma))` (the denominator floored at `1 - sigma_max`, the
    schedule's largest sigma below 1, so `sigma = 1` stays finite) and `dt = sigma_next - sigma < 0`:
    `mean = x (1 + std_t^2 dt / (2 sigma)) + v (1 + std_t^2 (1 - sigma) / (2 sigma)) dt` and
    `x_next ~ N(mean, std_t^2 |dt|)`.

    Args:
        next_latents: the transition's end point; drawn on `generator` when not given.
        noise_grid: explore in the low frequencies only: the noise is drawn on a `noise_grid x noise_grid` lattice per
            channel and upsampled (nearest), so `x_next - mean` is constant on each block; the log-probability is
            then that of the block means, `N(pool(x_next) - pool(mean); 0, std^2)`, averaged over blocks (the
            score-function noise of the policy gradient grows with the explored dimension). None: every element.

    Returns:
        `(next_latents, log_prob, mean, std)`: the log-probability is averaged over the latent's elements (blocks
        with `noise_grid`; one value per sample, as in Flow-GRPO); `std = std_t * sqrt(|dt|)` is the transition's
        standard deviation.
    """
    if eta <= 0:
        raise ValueError(f"the SDE step needs a noise level eta > 0, got {eta}.")
    x, v = latents.float(), velocity.float()
    dt = sigma_next - sigma
    std_t = eta * torch.sqrt(sigma / (1 - sigma).clamp_min(1 - sigma_max))
    mean = x * (1 + std_t**2 / (2 * sigma) * dt) + v * (1 + std_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_t * torch.sqrt(-dt)
    block = (1, 1) if noise_grid is None else _block_size(x.shape[-2:], noise_grid)
    if next_latents is None:
        shape = (*x.shape[:-2], x.shape[-2] // block[0], x.shape[-1] // block[1])
        noise = torch.randn(shape, generator=generator, device=None if generator is None else generator.device)
        noise = noise.to(mean.device)
        if block != (1, 1):
            noise = noise.repeat_interleave(block[0], -2).repeat_interleave(block[1], -1)
        next_latents = (mean.detach() + std * noise).to(latents.dtype)
    # On the stored (cast) sample, so recomputing it during training gives the same value.
    residual = next_latents.detach().float() - mean
    if block != (1, 1):
        residual = F.avg_pool2d(residual, block)
    log_prob = -(residual**2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return next_latents, log_prob.mean(dim=tuple(range(1, x.ndim))), mean, std


def _block_size(size: tuple[int, int], grid: int) -> tuple[int, int]:
    if grid < 1 or size[0] % grid or size[1] % grid:
        raise ValueError(f"noise_grid must divide the latent's height and width; got {grid} for {tuple(size)}.")
    return size[0] // grid, size[1] // grid


# ----------------------------------------------------------------------------------------------- generator LoRA


def add_generator_lora(
    transformer, rank: int, alpha: float, target_modules: list[str] | None = None, init: str | bool = True
) -> None:
    """Add the trainable generator LoRA (adapter `"generator"`) with diffusers' `add_adapter` (which makes it the
    active adapter). A DiNa reward sharing the blocks keeps its own adapter switched off outside its forward, so the
    order of the two does not matter."""
    if GENERATOR_ADAPTER in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"the transformer already has an adapter named {GENERATOR_ADAPTER!r}.")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights=init,
        target_modules=target_modules or list(generator_lora_targets(transformer)),
    )
    transformer.add_adapter(config, adapter_name=GENERATOR_ADAPTER)


def generator_lora_targets(transformer) -> tuple[str, ...]:
    """The generator LoRA's default targets: the attention projections of the transformer's backbone family."""
    return backbone_class(backbone_type_for(type(transformer))).default_lora_targets


def generator_lora_parameters(transformer) -> list[torch.nn.Parameter]:
    """The generator LoRA's parameters (in a fixed order)."""
    params = [p for n, p in transformer.named_parameters() if f".{GENERATOR_ADAPTER}." in n and "lora_" in n]
    if not params:
        raise ValueError(f"the transformer has no {GENERATOR_ADAPTER!r} LoRA; add it with `add_generator_lora`.")
    return params


def generator_lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    """The generator LoRA in peft's key names (adapter name removed), as diffusers saves it.

    The state dict is narrowed to the generator's keys first: peft drops other adapters' keys only when they are
    registered in the model's `peft_config`, and a DiNa reward's adapter is registered on its backbone instead.
    """
    own = {k: v for k, v in transformer.state_dict().items() if f".{GENERATOR_ADAPTER}." in k}
    return get_peft_model_state_dict(transformer, state_dict=own, adapter_name=GENERATOR_ADAPTER)


def save_generator_lora(pipe: StableDiffusion3Pipeline, directory: str | os.PathLike) -> None:
    """Save the generator LoRA in diffusers' format (with its `LoraConfig` as metadata), loadable into a fresh
    pipeline with `pipe.load_lora_weights(directory)`."""
    StableDiffusion3Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers=generator_lora_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=pipe.transformer.peft_config[GENERATOR_ADAPTER].to_dict(),
    )


def load_generator_lora(transformer, directory: str | os.PathLike) -> None:
    """Load weights written by `save_generator_lora` into the transformer's existing generator LoRA."""
    path = os.path.join(directory, LORA_WEIGHTS_NAME)
    state = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
    expected = set(generator_lora_state_dict(transformer))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KeyError(f"{path}: missing keys {missing[:3]}, unexpected keys {unexpected[:3]}.")
    set_peft_model_state_dict(transformer, state, adapter_name=GENERATOR_ADAPTER)


@contextmanager
def generator_lora_disabled(transformer):
    """Run the transformer as the reference model: no adapter active (the frozen base), restored afterwards."""
    layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
    saved = [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = []
    try:
        yield
    finally:
        for layer, active in zip(layers, saved):
            layer._active_adapter = active
