"""Z-Image (`ZImageTransformer2DModel`): the refiners and the first single-stream layers over the joint
[image, caption] sequence, run as `ZImageTransformer2DModel.forward` and `ZImagePipeline` run them (SPEC §7)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import ZImageTransformer2DModel
from torch.nn.utils.rnn import pad_sequence

from .backbone_base import BackboneFeatures, PromptEmbeds, TransformerSliceBackbone

ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class ZImageBackbone(TransformerSliceBackbone):
    """`t_embedder` (width 256), `all_x_embedder` + `noise_refiner` (image), `cap_embedder` + `context_refiner`
    (caption), then the first `num_layers` of `layers` on the unified sequence `[image tokens, caption tokens]`.

    Streams: after each layer the image stream is the sequence's image part (padded by the model to a multiple of 32
    with its pad token, as the authors' reward reads it) and the text stream is the caption part; `text_mask` marks the
    caption tokens the model attends to (it differs per sample when prompts have different lengths). The transformer's
    timestep is `1 - sigma` (`ZImagePipeline` passes `(1000 - t) / 1000`).
    """

    family = "zimage"
    transformer_class = "ZImageTransformer2DModel"
    pipeline_class = "ZImagePipeline"
    text_components = ("text_encoder", "tokenizer")
    default_lora_targets = ZIMAGE_LORA_TARGETS
    no_split_modules = ("ZImageTransformerBlock",)
    kept_modules = (
        "t_embedder",
        "all_x_embedder",
        "noise_refiner",
        "cap_embedder",
        "context_refiner",
        "x_pad_token",
        "cap_pad_token",
        "rope_embedder",
    )
    blocks_name = "layers"
    uses_pooled = False
    uses_text_mask = True

    # The sequence assembly is the transformer's own code (basic, non-omni mode), borrowed rather than rewritten.
    patchify_and_embed = ZImageTransformer2DModel.patchify_and_embed
    _patchify_image = ZImageTransformer2DModel._patchify_image
    _pad_with_ids = ZImageTransformer2DModel._pad_with_ids
    create_coordinate_grid = ZImageTransformer2DModel.__dict__["create_coordinate_grid"]
    _prepare_sequence = ZImageTransformer2DModel._prepare_sequence
    _build_unified_sequence = ZImageTransformer2DModel._build_unified_sequence

    def __init__(self, backbone_config: dict, *args, **kwargs):
        if backbone_config.get("siglip_feat_dim"):
            raise ValueError("Z-Image Omni bases (`siglip_feat_dim` set) are not supported.")
        super().__init__(backbone_config, *args, **kwargs)
        self.temb_dim = min(self.token_dim, 256)  # the transformer's ADALN_EMBED_DIM
        self.latent_channels = backbone_config["in_channels"]
        self.patch_size = backbone_config["all_patch_size"][0]
        self.f_patch_size = backbone_config["all_f_patch_size"][0]
        self.t_scale = backbone_config["t_scale"]
        self.max_patches = min(backbone_config["axes_lens"][1:])

    @classmethod
    def depth(cls, backbone_config: dict) -> int | None:
        return backbone_config.get("n_layers")

    @classmethod
    def token_width(cls, backbone_config: dict) -> int:
        return backbone_config["dim"]

    @classmethod
    def prompt_widths(cls, backbone_config: dict) -> tuple[int | None, None]:
        return backbone_config.get("cap_feat_dim"), None

    def _embed(self, images: list[torch.Tensor], captions: list[torch.Tensor], adaln_input: torch.Tensor):
        """Patchify, embed and refine both parts, then join them: the forward's steps before its main layers."""
        patch, f_patch, device = self.patch_size, self.f_patch_size, images[0].device
        x, cap, _, x_pos_ids, cap_pos_ids, x_pad_mask, cap_pad_mask = self.patchify_and_embed(
            images, captions, patch, f_patch
        )
        x_lengths = [len(item) for item in x]
        x = self.all_x_embedder[f"{patch}-{f_patch}"](torch.cat(x, dim=0))
        x, x_freqs, x_mask, _, _ = self._prepare_sequence(
            list(x.split(x_lengths, dim=0)), x_pos_ids, x_pad_mask, self.x_pad_token, None, device
        )
        for layer in self.noise_refiner:
            x = self._checkpointed(layer, x, x_mask, x_freqs, adaln_input)
        cap_lengths = [len(item) for item in cap]
        cap = self.cap_embedder(torch.cat(cap, dim=0))
        cap, cap_freqs, cap_mask, _, _ = self._prepare_sequence(
            list(cap.split(cap_lengths, dim=0)), cap_pos_ids, cap_pad_mask, self.cap_pad_token, None, device
        )
        for layer in self.context_refiner:
            cap = self._checkpointed(layer, cap, cap_mask, cap_freqs)
        unified, freqs, mask, _ = self._build_unified_sequence(
            x, x_freqs, x_lengths, None, cap, cap_freqs, cap_lengths, None, None, None, None, None, False, device
        )
        return unified, freqs, mask, x_lengths[0]

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> BackboneFeatures:
        images = list(latents.unsqueeze(2).unbind(dim=0))  # ZImagePipeline: one (C, 1, h, w) item per sample
        if encoder_attention_mask is None:
            captions = list(encoder_hidden_states.unbind(dim=0))
        else:
            captions = [embeds[mask.bool()] for embeds, mask in zip(encoder_hidden_states, encoder_attention_mask)]
        t = (1000 - timestep) / 1000
        adaln_input = self.t_embedder(t * self.t_scale).type_as(images[0])
        unified, freqs, mask, image_length = self._embed(images, captions, adaln_input)
        text_mask = mask[:, image_length:] if mask is not None else None
        visual, text = [], []
        self._tap(0, visual, text, unified[:, :image_length], unified[:, image_length:])
        for index, layer in enumerate(self.layers, start=1):
            unified = self._checkpointed(layer, unified, mask, freqs, adaln_input)
            self._tap(index, visual, text, unified[:, :image_length], unified[:, image_length:])
        return BackboneFeatures(temb=adaln_input, visual=visual, text=text, text_mask=text_mask)

    @classmethod
    def encode_prompt(
        cls, components: Mapping, prompts: list[str], *, max_sequence_length: int, device=None
    ) -> PromptEmbeds:
        """Second-to-last Qwen3 states under its chat template, real tokens only (`ZImagePipeline._encode_prompt`),
        zero-padded to `max_sequence_length` with the mask of real tokens."""
        captions = cls.text_pipeline(components)._encode_prompt(
            prompt=list(prompts), device=device, max_sequence_length=max_sequence_length
        )
        embeds = pad_sequence(captions, batch_first=True)
        mask = pad_sequence([torch.ones(len(c), dtype=torch.bool, device=c.device) for c in captions], batch_first=True)
        pad = max_sequence_length - embeds.shape[1]
        return PromptEmbeds(
            embeds=torch.nn.functional.pad(embeds, (0, 0, 0, pad)), mask=torch.nn.functional.pad(mask, (0, pad))
        )
