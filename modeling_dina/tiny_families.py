"""Tiny FLUX.1, Qwen-Image and Z-Image transformers built locally (no download), with the classes and wiring of the
real ones, for tests and benchmarks; and the real transformers' configs for meta-device parameter counts."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, ZImageTransformer2DModel

__all__ = ["TINY_FAMILY_DINA", "TINY_PROMPT_WIDTHS", "build_tiny_transformer"]

# Latents of every tiny family have 4 channels; prompt embeddings are (B, L, TINY_PROMPT_WIDTHS[family]) and FLUX's
# pooled vector has width 16.
TINY_PROMPT_WIDTHS = {"flux": 32, "qwenimage": 32, "zimage": 24}

_TINY_CONFIGS = {
    "flux": (
        FluxTransformer2DModel,
        dict(
            in_channels=16,
            num_layers=3,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        ),
    ),
    "qwenimage": (
        QwenImageTransformer2DModel,
        dict(
            in_channels=16,
            out_channels=4,
            num_layers=3,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            axes_dims_rope=(4, 6, 6),
        ),
    ),
    "zimage": (
        ZImageTransformer2DModel,
        dict(
            in_channels=4,
            dim=32,
            n_layers=3,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            cap_feat_dim=24,
            axes_dims=[4, 6, 6],
            axes_lens=[256, 64, 64],
        ),
    ),
}

# A DiNa-LRM on each tiny transformer: its first 2 of 3 blocks, the embedders' output and both blocks tapped.
TINY_FAMILY_DINA = dict(
    num_backbone_layers=2,
    visual_layers=[0, 1, 2],
    text_layers=[1, 2],
    lora_rank=4,
    lora_alpha=8,
    head_width=16,
    head_use_proj_in=True,
    head_num_attention_heads=4,
    max_sequence_length=16,
)


def build_tiny_transformer(family: str, seed: int = 0):
    """A randomly initialised (seeded) tiny transformer of `family` ("flux", "qwenimage" or "zimage"), in eval mode.
    Z-Image's pad tokens start at zero in diffusers; they get random values here so that padding shows in tests."""
    if family not in _TINY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(_TINY_CONFIGS)}.")
    cls, config = _TINY_CONFIGS[family]
    torch.manual_seed(seed)
    transformer = cls(**config)
    if family == "zimage":
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    return transformer.eval()
