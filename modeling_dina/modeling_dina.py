"""DiNa-LRM: the first blocks of the generator's own diffusion transformer (+ LoRA) read a noisy latent; a reward head
turns the tapped token streams into one score (SPEC §3)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .backbones import (
    DiNaBackbone,
    build_backbone,
)
from .configuration_dina import DiNaConfig
from .modeling_loading import ADAPTER_NAME, WEIGHTS_NAME, DiNaLoadingMixin
from .noise import NoiseGrid, noise_latents
from .reward_head import DiNaRewardHead


@dataclass
class DiNaRewardOutput(ModelOutput):
    """
    Args:
        rewards (`torch.FloatTensor` of shape `(batch_size,)`): the raw rewards.
        scores (`torch.FloatTensor` of shape `(batch_size,)`): the released normalisation `(raw + offset) / scale`.
        sigmas (`torch.FloatTensor`, *optional*): from `score_clean`, the snapped noise levels used: `(K,)` for a
            K-level ensemble, `(1,)` or `(batch_size,)` for one level.
        timesteps (`torch.FloatTensor`, *optional*): the matching transformer timesteps (`sigma * 1000`).
    """

    rewards: torch.FloatTensor | None = None
    scores: torch.FloatTensor | None = None
    sigmas: torch.FloatTensor | None = None
    timesteps: torch.FloatTensor | None = None


class DiNaRewardModel(DiNaLoadingMixin, PreTrainedModel):
    """DiNa-LRM on already-noised latents: backbone (first N blocks of the base, frozen, + LoRA) -> reward head.

    Build it from a base with [`~DiNaRewardModel.from_base`], load a trained one with
    [`~DiNaRewardModel.from_pretrained`]; `DiNaRewardModel(config)` builds random weights (use the `meta` device to
    count parameters without memory).
    """

    config_class = DiNaConfig
    base_model_prefix = "dina"
    main_input_name = "latents"
    base_location: str | None = None  # where `from_pretrained` found the base (a folder or Hub id), if not a module
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiNaRewardHead"]  # each instance adds its backbone family's blocks (`no_split_modules`)

    def __init__(self, config: DiNaConfig, backbone: DiNaBackbone | None = None):
        super().__init__(config)
        self.backbone = backbone if backbone is not None else build_backbone(config)
        self._no_split_modules = [*self.backbone.no_split_modules, "DiNaRewardHead"]
        shared = getattr(self.backbone, "shared_with_base", False)
        for name, param in self.backbone.named_parameters():
            if "lora_" not in name:  # base weights are frozen; a generator's own adapters keep their setting
                param.requires_grad_(False)
        if config.use_lora:
            lora = LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                init_lora_weights=config.lora_init,
                target_modules=list(config.lora_target_modules),
                exclude_modules=self.backbone.lora_exclude_modules() or None,
            )
            if shared and any(ADAPTER_NAME in m.lora_A for _, m in self._lora_layers()):
                raise ValueError(
                    f"the shared transformer already carries a `{ADAPTER_NAME}` adapter (another DiNaRewardModel built "
                    "on it); a second one would overwrite its LoRA. Reuse that model, or load the base separately."
                )
            before = {name: list(m.active_adapters) for name, m in self._lora_layers()}
            inject_adapter_in_model(lora, self.backbone, adapter_name=ADAPTER_NAME)
            if shared:
                # The blocks are the generator's own: it keeps its adapters; ours is switched on only while scoring.
                for name, layer in self._lora_layers():
                    layer._active_adapter = before.get(name, [])
            for name, param in self.backbone.named_parameters():
                if f".{ADAPTER_NAME}." in name:
                    param.requires_grad_(True)
        self.reward_head = DiNaRewardHead.from_config(config, self.backbone.token_dim, self.backbone.temb_dim)
        self.post_init()

    def _lora_layers(self):
        return [(name, m) for name, m in self.backbone.named_modules() if isinstance(m, LoraLayer)]

    @contextmanager
    def reward_adapter(self):
        """Run the backbone with exactly the reward LoRA active (and restore what was active after): needed when
        the blocks are shared with a generator that has adapters of its own."""
        layers = self._lora_layers() if self.config.use_lora else []
        saved = [layer._active_adapter for _, layer in layers]
        for _, layer in layers:
            layer._active_adapter = [ADAPTER_NAME]
        try:
            yield
        finally:
            for (_, layer), active in zip(layers, saved):
                layer._active_adapter = active

    def fuse_reward_lora(self, fused: bool = True) -> None:
        """Fold the reward LoRA into the kept blocks' weights (peft `merge`), or take it back out (`fused=False`).

        For scoring-only models: one matmul per projection instead of three. Refused when the blocks are shared with
        a generator (`from_pipe`: its own outputs would change) or while the LoRA is being trained."""
        if fused and getattr(self.backbone, "shared_with_base", False):
            raise ValueError("the backbone's blocks are shared with a generator: fusing would change its outputs.")
        if fused and self.training:
            raise ValueError("the model is in training mode: fuse the LoRA only for scoring (`.eval()`).")
        for _, layer in self._lora_layers():
            if ADAPTER_NAME not in layer.lora_A:
                continue
            if fused and not layer.merged:
                layer.merge(adapter_names=[ADAPTER_NAME])
            elif not fused and layer.merged:
                layer.unmerge()

    def compile_regions(self, **compile_kwargs) -> None:
        """`torch.compile` each kept block and the reward head, in place (`nn.Module.compile`: parameter names and
        saving are unchanged). Regional compilation: the blocks are alike, so they share one compiled graph and the
        compile time is about one block's, not the backbone's. `compile_kwargs` go to `torch.compile`."""
        for block in getattr(self.backbone, self.backbone.blocks_name):
            block.compile(**compile_kwargs)
        self.reward_head.compile(**compile_kwargs)

    def _init_weights(self, module):
        # Every submodule initialises itself (SPEC §3 zero-inits included); base weights come from the base.
        pass

    @cached_property
    def noise_grid(self) -> NoiseGrid:
        """The base scheduler's training grid (SPEC §1), where requested noise levels are snapped."""
        return NoiseGrid.from_scheduler_config(self.config.scheduler_config)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """The released score normalisation `(raw + offset) / scale`."""
        return (rewards + self.config.score_offset) / self.config.score_scale

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> DiNaRewardOutput | tuple:
        """Rewards of already-noised latents.

        Args:
            latents: `(B, C, H, W)` noised latents, or `(K, B, C, H, W)` for the noise ensemble of SPEC §3: the K
                levels run through the backbone in one batched call, their head tokens are concatenated, and the
                head runs once.
            timestep: the transformer timestep (`sigma * 1000`): a scalar, `(B,)`, or for the ensemble `(K,)` or
                `(K, B)`.
            encoder_hidden_states: `(B, L, D_text)` prompt embeddings (shared by the K levels).
            pooled_projections: `(B, D_pooled)` pooled prompt embeddings (SD3, FLUX; `None` for Qwen-Image, Z-Image).
            encoder_attention_mask: `(B, L)`, true for real prompt tokens (Qwen-Image, Z-Image; `None` for SD3, FLUX).
        """
        num_levels = latents.shape[0] if latents.ndim == 5 else 1
        if latents.ndim not in (4, 5):
            raise ValueError(f"`latents` must be (B, C, H, W) or (K, B, C, H, W), got shape {tuple(latents.shape)}.")
        batch = latents.shape[-4]
        if latents.shape[-3] != self.backbone.latent_channels:
            raise ValueError(
                f"`latents` have {latents.shape[-3]} channels; the backbone reads {self.backbone.latent_channels}."
            )
        self._check_prompt_inputs(batch, encoder_hidden_states, pooled_projections, encoder_attention_mask)
        timestep = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32)
        timestep = timestep.reshape(num_levels, -1).expand(num_levels, batch).reshape(-1)
        with self.reward_adapter():
            features = self.backbone(
                latents.reshape(num_levels * batch, *latents.shape[-3:]),
                timestep,
                encoder_hidden_states.repeat(num_levels, 1, 1),
                None if pooled_projections is None else pooled_projections.repeat(num_levels, 1),
                None if encoder_attention_mask is None else encoder_attention_mask.repeat(num_levels, 1),
            )
        rewards = self.reward_head(
            features.visual, features.text, features.temb, num_levels=num_levels, text_mask=features.text_mask
        )
        scores = self.normalize(rewards)
        if not return_dict:
            return rewards, scores
        return DiNaRewardOutput(rewards=rewards, scores=scores)

    def _check_prompt_inputs(self, batch: int, embeds, pooled, mask) -> None:
        family = type(self.backbone)
        if embeds.shape[0] != batch:
            raise ValueError(f"{batch} latents but {embeds.shape[0]} prompt embeddings.")
        if family.uses_pooled and (pooled is None or pooled.shape[0] != batch):
            got = "none" if pooled is None else pooled.shape[0]
            raise ValueError(f"{batch} latents but {got} pooled embeddings (the {family.family} backbone needs them).")
        if not family.uses_pooled and pooled is not None:
            raise ValueError(
                f"the {family.family} backbone reads no pooled prompt embedding: pass `pooled_projections=None`."
            )
        if mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
            raise ValueError(
                f"`encoder_attention_mask` has shape {tuple(mask.shape)}, the prompt embeddings "
                f"{tuple(embeds.shape[:2])}."
            )

    def noised_inputs(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        **noise_kwargs,
    ) -> tuple[dict[str, torch.Tensor | None], torch.Tensor]:
        """`forward` arguments for clean latents, and the snapped sigmas (`noise.noise_latents` with the model's grid;
        `noise_kwargs` as in [`score_clean`]). A trainer whose model is wrapped (DDP) calls the wrapper with them."""
        noised, sigmas, timesteps = noise_latents(self.noise_grid, latents, **noise_kwargs)
        inputs = {
            "latents": noised.to(self.dtype),
            "timestep": timesteps,
            "encoder_hidden_states": prompt_embeds.to(self.dtype),
            "pooled_projections": None if pooled_prompt_embeds is None else pooled_prompt_embeds.to(self.dtype),
            "encoder_attention_mask": encoder_attention_mask,
        }
        return inputs, sigmas

    def score_clean(
        self, latents, prompt_embeds, pooled_prompt_embeds=None, encoder_attention_mask=None, **noise_kwargs
    ) -> DiNaRewardOutput:
        """Rewards of clean latents, the one scoring path of the package (pipeline, trainer, alignment, Shapes):
        [`noised_inputs`] (snap, noise), then one batched backbone call for every level and the head (SPEC §3).

        Args:
            latents: `(B, C, H, W)` clean latents (VAE space, shifted and scaled).
            prompt_embeds, pooled_prompt_embeds: `(B, L, D)` and `(B, P)` prompt encodings (pooled: SD3, FLUX).
            encoder_attention_mask: `(B, L)` prompt mask (Qwen-Image, Z-Image).
            noise_level: one level in [0, 1] for all items, or a `(B,)` tensor of one level per item.
            noise_levels: the K levels of a noise ensemble (one reward per item from the K levels' tokens).
            noise: `(B, C, H, W)` Gaussian draw; else drawn with `generator` (on the generator's device, so a seeded
                CPU generator gives the same noise on every device) or the global RNG.
        Returns a [`DiNaRewardOutput`] with fp32 `rewards`/`scores` and the `sigmas`/`timesteps` used.
        """
        inputs, sigmas = self.noised_inputs(
            latents, prompt_embeds, pooled_prompt_embeds, encoder_attention_mask, **noise_kwargs
        )
        rewards = self(*inputs.values()).rewards.float()  # positional, as `forward` hooks see a direct call
        return DiNaRewardOutput(
            rewards=rewards, scores=self.normalize(rewards), sigmas=sigmas, timesteps=inputs["timestep"]
        )


__all__ = ["ADAPTER_NAME", "WEIGHTS_NAME", "DiNaRewardModel", "DiNaRewardOutput"]
