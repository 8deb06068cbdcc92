"""Qwen-Image (`QwenImageTransformer2DModel`): the first MMDiT blocks with the masked Qwen2.5-VL prompt, run as
`QwenImageTransformer2DModel.forward` and `QwenImagePipeline` run them (SPEC §7)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope, compute_text_seq_len_from_mask

from .backbone_base import BackboneFeatures, PromptEmbeds, TransformerSliceBackbone, pack_2x2
from .backbone_sd3 import SD3_LORA_TARGETS

UNSUPPORTED_OPTIONS = ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds")


class QwenImageBackbone(TransformerSliceBackbone):
    """`img_in`, `txt_norm` + `txt_in`, `time_text_embed(timestep, hidden_states)` (no pooled prompt), the rotary
    `pos_embed(img_shapes, text length)` and the first `num_layers` `QwenImageTransformerBlock`s with the text mask.

    Latents come unpacked `(B, C, h, w)` (the VAE's single frame dropped); they are packed 2x2 as the pipeline packs
    its `(B, 1, C, h, w)` latents, with `img_shapes = [(1, h/2, w/2)]`. The transformer's timestep is `sigma`.
    """

    family = "qwenimage"
    transformer_class = "QwenImageTransformer2DModel"
    pipeline_class = "QwenImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    default_lora_targets = SD3_LORA_TARGETS
    no_split_modules = ("QwenImageTransformerBlock",)
    kept_modules = ("pos_embed", "time_text_embed", "txt_norm", "img_in", "txt_in")
    uses_pooled = False
    uses_text_mask = True
    video_vae = True
    packed_latents = True
    max_patches = 8192  # the rotary table: 4096 positions either side of the centre

    def __init__(self, backbone_config: dict, *args, **kwargs):
        unsupported = [name for name in UNSUPPORTED_OPTIONS if backbone_config.get(name)]
        if unsupported:
            raise ValueError(f"Qwen-Image bases with {unsupported} set (edit/layered variants) are not supported.")
        super().__init__(backbone_config, *args, **kwargs)
        if self.pos_embed.pos_freqs.is_meta:
            # The rotary tables are plain tensors, not weights: on the meta device they must be rebuilt for real.
            with torch.device("cpu"):
                self.pos_embed = QwenEmbedRope(10000, list(backbone_config["axes_dims_rope"]), scale_rope=True)
        self.temb_dim = self.token_dim
        self.latent_channels = backbone_config["in_channels"] // 4
        self.patch_size = backbone_config["patch_size"]

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> BackboneFeatures:
        batch, _, height, width = latents.shape
        hidden_states = self.img_in(pack_2x2(latents))
        # QwenImagePipeline passes `t / 1000` in the latents' dtype; the transformer casts it again.
        sigma = (timestep.to(hidden_states.dtype) / 1000).to(hidden_states.dtype)
        encoder_hidden_states = self.txt_in(self.txt_norm(encoder_hidden_states))
        mask = encoder_attention_mask
        if mask is not None and mask.all():
            mask = None  # as `QwenImagePipeline.encode_prompt`: a mask without padding is dropped
        text_length, _, mask = compute_text_seq_len_from_mask(encoder_hidden_states, mask)
        temb = self.time_text_embed(sigma, hidden_states)
        image_shapes = [[(1, height // 2, width // 2)]] * batch
        rotary = self.pos_embed(image_shapes, max_txt_seq_len=text_length, device=hidden_states.device)
        visual, text = [], []
        self._tap(0, visual, text, hidden_states, encoder_hidden_states)
        for index, block in enumerate(self.transformer_blocks, start=1):
            encoder_hidden_states, hidden_states = self._checkpointed(
                block, hidden_states, encoder_hidden_states, mask, temb, rotary
            )
            self._tap(index, visual, text, hidden_states, encoder_hidden_states)
        return BackboneFeatures(temb=temb, visual=visual, text=text, text_mask=mask)

    @staticmethod
    def vae_scale_factor(vae) -> int:
        return 2 ** len(vae.temperal_downsample)  # as `QwenImagePipeline`

    @staticmethod
    def latent_normalization(vae_config) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel `(latents_mean, 1 / latents_std)`: normalised latents `(z - mean) / std`, as the pipeline."""
        return torch.tensor(vae_config.latents_mean), 1.0 / torch.tensor(vae_config.latents_std)

    @classmethod
    def encode_prompt(
        cls, components: Mapping, prompts: list[str], *, max_sequence_length: int, device=None
    ) -> PromptEmbeds:
        """The last hidden states of Qwen2.5-VL under the pipeline's system template (template tokens dropped), by
        `QwenImagePipeline.encode_prompt`; zero-padded to `max_sequence_length` with the mask of real tokens."""
        embeds, mask = cls.text_pipeline(components).encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        pad = max_sequence_length - embeds.shape[1]
        return PromptEmbeds(embeds=F.pad(embeds, (0, 0, 0, pad)), mask=F.pad(mask.bool(), (0, pad)))
