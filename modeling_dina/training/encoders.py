"""The base's encoders for the training cache: its family's diffusers pipeline without the transformer, the family's
prompt encoding and VAE convention (the reward pipeline's own), and the size geometry of its transformer."""

from __future__ import annotations

import os
from collections.abc import Sequence

import diffusers
import torch

from ..backbone_base import PromptEmbeds
from ..backbones import backbone_for_pipeline, base_backbone_class, read_backbone_config, resolve_base_folder
from ..image_processing_dina import DiNaImageProcessor


def load_encoders(base_or_pipeline, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
    """The base's text encoders and VAE as its family's diffusers pipeline (`StableDiffusion3Pipeline`,
    `FluxPipeline`, `QwenImagePipeline` or `ZImagePipeline`) without its transformer.

    A folder or Hub id is loaded with the text encoders in `dtype` and the VAE in fp32; a loaded pipeline is used as
    it is.
    """
    if not isinstance(base_or_pipeline, (str, os.PathLike)):
        return base_or_pipeline
    family = base_backbone_class(os.fspath(base_or_pipeline))
    dtypes = {"default": dtype or torch.float32, "vae": torch.float32}
    pipeline_class = getattr(diffusers, family.pipeline_class)
    pipe = pipeline_class.from_pretrained(os.fspath(base_or_pipeline), transformer=None, dtype=dtypes)
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: Sequence[str], *, max_sequence_length: int, batch_size: int) -> PromptEmbeds:
    """The family's prompt encoding (`DiNaBackbone.encode_prompt`) of `prompts`, `batch_size` prompts a call, as fp32
    CPU tensors: embeddings `(N, L, D)`, pooled `(N, P)` and the mask of real tokens `(N, L)` where the family has
    them."""
    family = backbone_for_pipeline(pipe)
    parts = [
        family.encode_prompt(
            pipe.components, list(prompts[start : start + batch_size]), max_sequence_length=max_sequence_length
        )
        for start in range(0, len(prompts), batch_size)
    ]

    def joined(name: str, dtype: torch.dtype) -> torch.Tensor | None:
        values = [getattr(part, name) for part in parts]
        return None if values[0] is None else torch.cat([v.to(device="cpu", dtype=dtype) for v in values])

    return PromptEmbeds(joined("embeds", torch.float32), joined("pooled", torch.float32), joined("mask", torch.bool))


def image_to_pixels(
    image, size: tuple[int, int], *, mode: str = "crop", processor: DiNaImageProcessor | None = None
) -> torch.Tensor:
    """An image fitted to `size` = (width, height) by the image processor (the pipeline's decoding: EXIF orientation,
    alpha over white, 16-bit), as a `(3, H, W)` tensor in [-1, 1]."""
    processor = processor or DiNaImageProcessor()
    return processor.preprocess_images([image], (size[1], size[0]), mode=mode)[0]


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, *, batch_size: int, sample_posterior: bool = False, generator=None):
    """VAE latents (fp32, CPU) of `(N, 3, H, W)` pixels in [-1, 1], by the family's `encode_pixels` (as the reward
    pipeline's `encode_images`)."""
    family = backbone_for_pipeline(pipe)
    latents = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size]
        latents.append(family.encode_pixels(pipe.vae, batch, sample_posterior, generator).cpu())
    return torch.cat(latents)


def base_geometry(base_or_pipeline, pipe) -> tuple[int, int | None, int, int]:
    """Bucket multiple (VAE factor x patch size), the largest side the position table allows, the native side and the
    latent channels of the base, from its family's backbone (one block, built on the meta device)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        config = dict(transformer.config)
    elif isinstance(base_or_pipeline, (str, os.PathLike)):
        config = read_backbone_config(resolve_base_folder(os.fspath(base_or_pipeline)))
    else:
        raise ValueError("a pipeline without its transformer: pass the base folder or Hub id instead")
    family = backbone_for_pipeline(pipe)
    with torch.device("meta"):
        backbone = family(config, 1, [1], [1])
    factor, patch = pipe.vae_scale_factor, backbone.patch_size
    max_side = backbone.max_patches * patch * factor if backbone.max_patches else None
    return factor * patch, max_side, family.native_side(config, factor), backbone.latent_channels


__all__ = ["base_geometry", "encode_images", "encode_prompts", "image_to_pixels", "load_encoders"]
