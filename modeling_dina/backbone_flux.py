"""FLUX.1 (`FluxTransformer2DModel`): the first double-stream blocks, run as `FluxTransformer2DModel.forward` and
`FluxPipeline` run them (SPEC §7)."""

from __future__ import annotations

from collections.abc import Mapping

import diffusers
import torch

from .backbone_base import BackboneFeatures, PromptEmbeds, TransformerSliceBackbone, pack_2x2
from .backbone_sd3 import SD3_LORA_TARGETS


class FluxBackbone(TransformerSliceBackbone):
    """`x_embedder`, `time_text_embed` (timestep, guidance for guidance-distilled bases, CLIP pooled),
    `context_embedder`, the rotary `pos_embed` and the first `num_layers` `FluxTransformerBlock`s (FLUX.1-dev: all 19
    double-stream blocks; the single-stream blocks after them are never run).

    Time convention: `FluxTransformer2DModel.forward` takes `sigma` and multiplies it (and the guidance) by 1000 before
    the time embedding; this backbone does the same from the transformer timestep `sigma * 1000`. Option
    `unscaled_time_embedding=True` instead feeds `sigma` and the raw guidance (3.5), as the authors' FLUX reward code
    does: checkpoints trained with it only score correctly that way.
    """

    family = "flux"
    transformer_class = "FluxTransformer2DModel"
    pipeline_class = "FluxPipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_lora_targets = SD3_LORA_TARGETS
    no_split_modules = ("FluxTransformerBlock",)
    kept_modules = ("pos_embed", "time_text_embed", "context_embedder", "x_embedder")
    packed_latents = True

    def __init__(self, backbone_config: dict, *args, **kwargs):
        super().__init__(backbone_config, *args, **kwargs)
        self.temb_dim = self.token_dim
        self.latent_channels = backbone_config["in_channels"] // 4  # the transformer reads 2x2-packed latents
        self.patch_size = 2
        self.guidance_embeds = bool(backbone_config.get("guidance_embeds", False))
        self.guidance_scale = float(self.options.get("guidance_scale", 3.5))
        self.time_scale = 1.0 if self.options.get("unscaled_time_embedding", False) else 1000.0

    def lora_exclude_modules(self) -> list[str]:
        """As for SD3: the last kept block's text-side projections get no LoRA unless its text stream is tapped."""
        if self.num_layers in self.text_layers:
            return []
        last = f"transformer_blocks.{self.num_layers - 1}.attn"
        return [f"{last}.{name}" for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]

    def _time_embedding(self, timestep, pooled, batch: int, dtype) -> torch.Tensor:
        # FluxPipeline passes `t / 1000` (in the latents' dtype); the transformer casts and scales it back.
        sigma = (timestep.to(dtype) / 1000).to(dtype)
        if not self.guidance_embeds:
            return self.time_text_embed(sigma * self.time_scale, pooled)
        guidance = torch.full((batch,), self.guidance_scale, device=sigma.device, dtype=torch.float32)
        return self.time_text_embed(sigma * self.time_scale, guidance.to(dtype) * self.time_scale, pooled)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> BackboneFeatures:
        if pooled_projections is None:
            raise ValueError("FLUX needs `pooled_projections` (the CLIP-L pooled prompt embedding).")
        if encoder_attention_mask is not None:
            raise ValueError("FLUX attends to every prompt token (T5 padding included): it takes no attention mask.")
        batch, _, height, width = latents.shape
        hidden_states = self.x_embedder(pack_2x2(latents))
        dtype = hidden_states.dtype
        temb = self._time_embedding(timestep, pooled_projections, batch, dtype)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        # FluxPipeline: text ids are zeros (L, 3); image ids are (row, column) of the 2x2 patches.
        text_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=latents.device, dtype=dtype)
        image_ids = diffusers.FluxPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, dtype
        )
        rotary = self.pos_embed(torch.cat((text_ids, image_ids), dim=0))
        visual, text = [], []
        self._tap(0, visual, text, hidden_states, encoder_hidden_states)
        for index, block in enumerate(self.transformer_blocks, start=1):
            encoder_hidden_states, hidden_states = self._checkpointed(
                block, hidden_states, encoder_hidden_states, temb, rotary
            )
            self._tap(index, visual, text, hidden_states, encoder_hidden_states)
        return BackboneFeatures(temb=temb, visual=visual, text=text)

    @classmethod
    def encode_prompt(
        cls, components: Mapping, prompts: list[str], *, max_sequence_length: int, device=None
    ) -> PromptEmbeds:
        """CLIP-L pooled output + T5 states at `max_sequence_length` tokens, by `FluxPipeline.encode_prompt`."""
        embeds, pooled, _ = cls.text_pipeline(components).encode_prompt(
            prompt=list(prompts), prompt_2=None, device=device, max_sequence_length=max_sequence_length
        )
        return PromptEmbeds(embeds=embeds, pooled=pooled)
