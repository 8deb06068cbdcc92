"""What every backbone family provides: the interface the model, head and pipeline see, and the shared slicing of a
diffusers transformer into its embedders and first blocks.

A family owns everything model-specific: which blocks run and how, the tapped streams, `temb`, latent packing and
position ids, the timestep and guidance conventions, prompt encoding, the VAE's latent normalisation, the size
geometry, the default LoRA targets and `_no_split_modules`. The families live one per file (`backbone_sd3.py`,
`backbone_flux.py`, `backbone_qwenimage.py`, `backbone_zimage.py`; flat files, so `trust_remote_code` can copy them)
and are registered in `backbones.BACKBONES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import diffusers
import torch
import torch.nn as nn
from peft.tuners.lora import LoraLayer


@dataclass
class BackboneFeatures:
    """What the reward head reads: the timestep embedding, the tapped token streams (lists, in layer order) and,
    for families with variable-length prompts, which text tokens are real (`(B, N_text)` bool, else `None`)."""

    temb: torch.Tensor
    visual: list[torch.Tensor]
    text: list[torch.Tensor]
    text_mask: torch.Tensor | None = None


@dataclass
class PromptEmbeds:
    """A family's prompt encoding: `embeds` `(B, L, D)`, `pooled` `(B, P)` for families with a pooled vector,
    `mask` `(B, L)` bool for families that attend to real tokens only (padded to `max_sequence_length`)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class DiNaBackbone(nn.Module):
    """Interface of a backbone family.

    Instances hold `token_dim`, `temb_dim`, `latent_channels`, `patch_size` (latent pixels per token side) and
    `max_patches` (tokens per side the position table allows; `None` when unbounded), are built from the base
    transformer's config dict (so they can live on the `meta` device) or share a loaded transformer's modules
    (`from_transformer`), say which keys of the base's state dict they hold (`keeps`), and run
    `forward(latents, timestep, encoder_hidden_states, pooled_projections=None, encoder_attention_mask=None)` on
    unpacked latents `(B, C, h, w)` with the transformer timestep `sigma * 1000`, returning `BackboneFeatures`.
    """

    family: str
    transformer_class: str  # the diffusers class whose first blocks this family runs
    pipeline_class: str  # the diffusers pipeline whose prompt encoding and VAE convention it follows
    text_components: tuple[str, ...]  # the pipeline components `encode_prompt` needs
    default_lora_targets: tuple[str, ...]
    no_split_modules: tuple[str, ...]
    uses_pooled = True  # a pooled prompt vector enters the time embedding
    uses_text_mask = False  # padded prompt tokens are masked out of attention
    video_vae = False  # the VAE reads and writes (B, C, frames, H, W)
    packed_latents = False  # the family's pipeline returns `output_type="latent"` latents packed 2x2
    last_block_drops_text = False  # the base's very last block emits no text stream (SD3's context_pre_only)
    token_dim: int
    temb_dim: int
    latent_channels: int
    patch_size: int
    max_patches: int | None = None
    blocks_name = "transformer_blocks"  # the attribute holding the kept blocks (an `nn.ModuleList`)
    gradient_checkpointing = False
    shared_with_base = False  # True when the modules are a generator's own (see `from_transformer`)

    @classmethod
    def depth(cls, backbone_config: dict) -> int | None:
        """How many blocks of the base this family can keep."""
        return backbone_config.get("num_layers")

    @classmethod
    def token_width(cls, backbone_config: dict) -> int:
        return backbone_config["num_attention_heads"] * backbone_config["attention_head_dim"]

    def keeps(self, key: str) -> bool:
        raise NotImplementedError

    def lora_exclude_modules(self) -> list[str]:
        return []

    @classmethod
    def encode_prompt(
        cls, components: Mapping, prompts: list[str], *, max_sequence_length: int, device=None
    ) -> PromptEmbeds:
        raise NotImplementedError

    @classmethod
    def text_pipeline(cls, components: Mapping):
        """The family's own diffusers pipeline holding only the text components (no copies: the same modules)."""
        pipeline_cls = getattr(diffusers, cls.pipeline_class)
        others = {name: None for name in ("transformer", "vae", "scheduler")}
        return pipeline_cls(**others, **{name: components[name] for name in cls.text_components})

    @classmethod
    def prompt_widths(cls, backbone_config: dict) -> tuple[int | None, int | None]:
        """Widths of the prompt embeddings and of the pooled vector the base reads (`None`: none, or not known)."""
        pooled = backbone_config.get("pooled_projection_dim") if cls.uses_pooled else None
        return backbone_config.get("joint_attention_dim"), pooled

    @classmethod
    def prompt_length(cls, components: Mapping, max_sequence_length: int) -> int | None:
        """Tokens of the family's prompt encoding at `max_sequence_length`; `None` where the length does not matter
        (families that mask padded tokens) or cannot be told from `components`."""
        return None if cls.uses_text_mask else max_sequence_length

    @staticmethod
    def vae_scale_factor(vae) -> int:
        """Pixels per latent cell of the family's VAE, as its pipeline computes it."""
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def native_side(cls, backbone_config: dict, vae_scale_factor: int) -> int:
        """The default image side of the family's pipeline (`default_sample_size` 128 latent cells unless the
        transformer config says `sample_size`)."""
        return backbone_config.get("sample_size", 128) * vae_scale_factor

    @classmethod
    def unpack_latents(cls, latents: torch.Tensor, height: int, width: int, vae_scale_factor: int) -> torch.Tensor:
        """Latents as the family's pipeline returns them with `output_type="latent"` -> the `(B, C, h, w)` the reward
        model reads, for images of `height` x `width` pixels (FLUX and Qwen-Image pack them 2x2 into
        `(B, h/2 * w/2, 4C)`; they are unpacked by the pipeline's own `_unpack_latents`)."""
        if not cls.packed_latents:
            if latents.ndim != 4:
                raise ValueError(f"{cls.pipeline_class} latents are (B, C, h, w), got shape {tuple(latents.shape)}.")
            return latents
        if latents.ndim != 3:
            raise ValueError(
                f"packed {cls.pipeline_class} latents are (B, tokens, 4C), got shape {tuple(latents.shape)}."
            )
        cells = (height // (vae_scale_factor * 2)) * (width // (vae_scale_factor * 2))
        if cells != latents.shape[1]:
            raise ValueError(
                f"{latents.shape[1]} packed tokens do not make a {height}x{width} image ({cells} tokens at "
                f"vae_scale_factor {vae_scale_factor}): pass the height and width the generator was called with."
            )
        unpacked = getattr(diffusers, cls.pipeline_class)._unpack_latents(latents, height, width, vae_scale_factor)
        return unpacked[:, :, 0] if cls.video_vae else unpacked

    @staticmethod
    def latent_normalization(vae_config) -> tuple[torch.Tensor, torch.Tensor]:
        """`(shift, scale)` with normalised latents `(z - shift) * scale` (SD3, FLUX and Z-Image VAEs)."""
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return torch.tensor(float(shift)), torch.tensor(float(vae_config.scaling_factor))

    @classmethod
    def encode_pixels(cls, vae, pixels: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        """Pixels `(B, 3, H, W)` in [-1, 1] -> normalised clean latents `(B, C, h, w)` (fp32), as the family's
        pipelines encode images."""
        inputs = pixels.unsqueeze(2) if cls.video_vae else pixels
        dist = vae.encode(inputs.to(device=vae.device, dtype=vae.dtype)).latent_dist
        z = dist.sample(generator) if sample_posterior else dist.mean
        z = z[:, :, 0] if cls.video_vae else z
        shift, scale = (t.to(z.device, torch.float32) for t in cls.latent_normalization(vae.config))
        if shift.ndim:
            shift, scale = shift.view(1, -1, 1, 1), scale.view(1, -1, 1, 1)
        return (z.float() - shift) * scale

    def _checkpointed(self, block, *args):
        """Run a block, through activation checkpointing when it is on and gradients are needed. The recomputation
        in backward runs after the model's forward has switched the reward LoRA off again (on blocks shared with a
        generator), so it re-activates the adapters that were active in the forward."""
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(_with_active_adapters(block), *args)
        return block(*args)


def _with_active_adapters(block: nn.Module):
    layers = [m for m in block.modules() if isinstance(m, LoraLayer)]
    active = [m._active_adapter for m in layers]

    def run(*args):
        saved = [m._active_adapter for m in layers]
        for layer, adapters in zip(layers, active):
            layer._active_adapter = adapters
        try:
            return block(*args)
        finally:
            for layer, adapters in zip(layers, saved):
                layer._active_adapter = adapters

    return run


class TransformerSliceBackbone(DiNaBackbone):
    """A family whose backbone is a slice of the diffusers transformer itself: the modules named in `kept_modules`
    and the first `num_layers` of `blocks_name`, taken from the transformer (a loaded one is shared, not copied; from
    a config the transformer is instantiated on the `meta` device and the rest of it dropped)."""

    kept_modules: tuple[str, ...]

    def __init__(
        self,
        backbone_config: dict,
        num_layers: int,
        visual_layers,
        text_layers,
        options: Mapping | None = None,
        transformer: nn.Module | None = None,
    ):
        super().__init__()
        if transformer is None:
            with torch.device("meta"):
                transformer = getattr(diffusers, self.transformer_class).from_config(backbone_config)
        self.num_layers, self.depth_of_base = num_layers, self.depth(backbone_config)
        self.visual_layers, self.text_layers = list(visual_layers), list(text_layers)
        self.options = dict(options or {})
        self.token_dim = self.token_width(backbone_config)
        for name in self.kept_modules:
            setattr(self, name, getattr(transformer, name))
        setattr(self, self.blocks_name, nn.ModuleList(getattr(transformer, self.blocks_name)[:num_layers]))

    @classmethod
    def from_transformer(cls, transformer: nn.Module, num_layers: int, visual_layers, text_layers, options=None):
        """Share a loaded transformer's embedders and first blocks (no copy) with a new backbone."""
        backbone = cls(dict(transformer.config), num_layers, visual_layers, text_layers, options, transformer)
        backbone.shared_with_base = True
        return backbone

    def keeps(self, key: str) -> bool:
        head = key.split(".", 1)[0]
        if head == self.blocks_name:
            return int(key.split(".")[1]) < self.num_layers
        return head in self.kept_modules

    def _tap(self, index: int, visual: list, text: list, image_tokens, text_tokens) -> None:
        """Keep the streams after block `index` (1-based, 0 = the embedders) where the config taps them."""
        if index in self.visual_layers:
            visual.append(image_tokens)
        if index in self.text_layers:
            text.append(text_tokens)


def pack_2x2(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` -> `(B, h/2 * w/2, 4C)`, the packing of `FluxPipeline._pack_latents` (also Qwen-Image's)."""
    b, c, h, w = latents.shape
    return diffusers.FluxPipeline._pack_latents(latents, b, c, h, w)
