"""SD3 / SD3.5 (`SD3Transformer2DModel`): the released DiNa-LRM family (SPEC §3-4)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from diffusers.models.attention import JointTransformerBlock
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings, PatchEmbed

from .backbone_base import BackboneFeatures, DiNaBackbone, PromptEmbeds

# The released LoRA targets: every attention projection of both streams (also `attn2`'s in SD3.5-M).
SD3_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class SD3Backbone(DiNaBackbone):
    """The first `num_layers` MMDiT blocks of an `SD3Transformer2DModel` with its embedders (SPEC §3)."""

    family = "sd3"
    transformer_class = "SD3Transformer2DModel"
    pipeline_class = "StableDiffusion3Pipeline"
    text_components = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    default_lora_targets = SD3_LORA_TARGETS
    no_split_modules = ("JointTransformerBlock",)
    last_block_drops_text = True

    def __init__(
        self,
        backbone_config: dict,
        num_layers: int,
        visual_layers: list[int],
        text_layers: list[int],
        options: Mapping | None = None,
    ):
        super().__init__()
        cfg = backbone_config
        inner_dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        depth = cfg["num_layers"]
        self.token_dim = self.temb_dim = inner_dim
        self.latent_channels = cfg["in_channels"]
        self.patch_size = cfg["patch_size"]
        self.max_patches = cfg.get("pos_embed_max_size") or cfg["sample_size"]
        self.num_layers, self.depth_of_base = num_layers, depth
        self.visual_layers, self.text_layers = list(visual_layers), list(text_layers)
        self.pos_embed = PatchEmbed(
            height=cfg["sample_size"],
            width=cfg["sample_size"],
            patch_size=cfg["patch_size"],
            in_channels=cfg["in_channels"],
            embed_dim=inner_dim,
            pos_embed_max_size=cfg.get("pos_embed_max_size"),
        )
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            embedding_dim=inner_dim, pooled_projection_dim=cfg["pooled_projection_dim"]
        )
        self.context_embedder = nn.Linear(cfg["joint_attention_dim"], cfg["caption_projection_dim"])
        dual = set(cfg.get("dual_attention_layers") or ())
        self.transformer_blocks = nn.ModuleList(
            JointTransformerBlock(
                dim=inner_dim,
                num_attention_heads=cfg["num_attention_heads"],
                attention_head_dim=cfg["attention_head_dim"],
                context_pre_only=i == depth - 1,  # as in the base: only its very last block drops the text stream
                qk_norm=cfg.get("qk_norm"),
                use_dual_attention=i in dual,
            )
            for i in range(num_layers)
        )

    @classmethod
    def from_transformer(
        cls, transformer: nn.Module, num_layers: int, visual_layers, text_layers, options=None
    ) -> SD3Backbone:
        """Share a loaded `SD3Transformer2DModel`'s embedders and first blocks (no copy) with a new backbone."""
        config = dict(transformer.config)
        with torch.device("meta"):
            backbone = cls(config, num_layers, visual_layers, text_layers)
        backbone.pos_embed = transformer.pos_embed
        backbone.time_text_embed = transformer.time_text_embed
        backbone.context_embedder = transformer.context_embedder
        backbone.transformer_blocks = nn.ModuleList(transformer.transformer_blocks[:num_layers])
        backbone.shared_with_base = True
        return backbone

    def keeps(self, key: str) -> bool:
        head = key.split(".", 1)[0]
        if head in ("pos_embed", "time_text_embed", "context_embedder"):
            return True
        if head == "transformer_blocks":
            return int(key.split(".")[1]) < self.num_layers
        return False

    def lora_exclude_modules(self) -> list[str]:
        """Released rule: the last kept block's text-side projections get no LoRA unless its text stream is tapped."""
        if self.num_layers in self.text_layers:
            return []
        last = f"transformer_blocks.{self.num_layers - 1}.attn"
        return [f"{last}.{name}" for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")]

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> BackboneFeatures:
        if encoder_attention_mask is not None:
            raise ValueError("SD3 attends to every prompt token (T5 padding included): it takes no attention mask.")
        hidden_states = self.pos_embed(latents).contiguous()
        temb = self.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = self.context_embedder(encoder_hidden_states)
        visual = [hidden_states] if 0 in self.visual_layers else []
        text = [encoder_hidden_states] if 0 in self.text_layers else []
        for index, block in enumerate(self.transformer_blocks, start=1):
            encoder_hidden_states, hidden_states = self._checkpointed(block, hidden_states, encoder_hidden_states, temb)
            if index in self.visual_layers:
                visual.append(hidden_states)
            if index in self.text_layers:
                text.append(encoder_hidden_states)
        return BackboneFeatures(temb=temb, visual=visual, text=text)

    @classmethod
    def prompt_length(cls, components: Mapping, max_sequence_length: int) -> int | None:
        """CLIP tokens (the CLIP tokenizer's length), then the T5 tokens."""
        tokenizer = components.get("tokenizer")
        return None if tokenizer is None else tokenizer.model_max_length + max_sequence_length

    @classmethod
    def encode_prompt(cls, components: Mapping, prompts: list[str], *, max_sequence_length: int, device=None):
        """CLIP-L + CLIP-G penultimate states and T5 (SPEC §4), by `StableDiffusion3Pipeline.encode_prompt`."""
        pipe = cls.text_pipeline(components)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeds(embeds=embeds, pooled=pooled)
