"""Backbones: the first blocks of a diffusion transformer, run as the generator runs them, with tapped streams.

Everything model-family specific lives behind `DiNaBackbone` (`backbone_base.py`), one file per family; the head,
losses and pipeline only see `BackboneFeatures`. This module registers the families (`BACKBONES`), picks one for a
loaded transformer, builds empty backbones from a config and fills them with only the base weights they keep.
"""

from __future__ import annotations

import json
import os

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from .backbone_base import BackboneFeatures, DiNaBackbone, PromptEmbeds
from .backbone_flux import FluxBackbone
from .backbone_qwenimage import QwenImageBackbone
from .backbone_sd3 import SD3Backbone
from .backbone_zimage import ZImageBackbone

__all__ = [
    "BACKBONES",
    "BackboneFeatures",
    "DiNaBackbone",
    "FluxBackbone",
    "PromptEmbeds",
    "QwenImageBackbone",
    "SD3Backbone",
    "ZImageBackbone",
    "backbone_class",
    "backbone_for_pipeline",
    "base_backbone_class",
    "backbone_type_for",
    "build_backbone",
    "load_base_weights",
    "read_transformer_class",
]


BACKBONES: dict[str, type[DiNaBackbone]] = {
    cls.family: cls for cls in (SD3Backbone, FluxBackbone, QwenImageBackbone, ZImageBackbone)
}


def backbone_type_for(transformer_class: type | str) -> str:
    """The family reading a diffusers transformer class (subclasses count), or a class name as in its config.json."""
    if isinstance(transformer_class, str):
        names = [transformer_class]
    else:
        names = [klass.__name__ for klass in transformer_class.__mro__]
    for family, cls in BACKBONES.items():
        if cls.transformer_class in names:
            return family
    known = ", ".join(f"{cls.transformer_class} ({family})" for family, cls in BACKBONES.items())
    raise TypeError(f"no DiNa backbone family reads a {names[0] if names else transformer_class}; known: {known}.")


def backbone_class(backbone_type: str) -> type[DiNaBackbone]:
    if backbone_type not in BACKBONES:
        raise ValueError(f"unknown `backbone_type` {backbone_type!r}; known: {sorted(BACKBONES)}.")
    return BACKBONES[backbone_type]


def backbone_for_pipeline(pipeline) -> type[DiNaBackbone]:
    """The family of a loaded pipeline: a reward pipeline's reward model, a generator's transformer, else the
    pipeline's own class (a family pipeline loaded without its transformer)."""
    reward_model = getattr(pipeline, "reward_model", None)
    if reward_model is not None:
        return type(reward_model.backbone)
    transformer = getattr(pipeline, "transformer", None)
    if transformer is not None:
        return backbone_class(backbone_type_for(type(transformer)))
    names = [klass.__name__ for klass in type(pipeline).__mro__]
    for cls in BACKBONES.values():
        if cls.pipeline_class in names:
            return cls
    known = ", ".join(cls.pipeline_class for cls in BACKBONES.values())
    raise TypeError(f"no DiNa backbone family follows a {names[0]}; known: {known}.")


def base_backbone_class(name_or_path: str, revision: str | None = None) -> type[DiNaBackbone]:
    """The family of a base pipeline folder or Hub id, from its transformer's config.json."""
    return backbone_class(
        backbone_type_for(read_transformer_class(resolve_base_folder(name_or_path, revision=revision)))
    )


def backbone_options(config) -> dict:
    """The family-level knobs of a `DiNaConfig` a backbone reads (guidance, time-embedding convention)."""
    return {"guidance_scale": config.guidance_scale, "unscaled_time_embedding": config.unscaled_time_embedding}


def build_backbone(config) -> DiNaBackbone:
    """An empty-weight (meta) backbone from a `DiNaConfig`'s `backbone_type` and `backbone_config`."""
    cls = backbone_class(config.backbone_type)
    with torch.device("meta"):
        return cls(
            config.backbone_config,
            config.num_backbone_layers,
            config.visual_layers,
            config.text_layers,
            backbone_options(config),
        )


def resolve_base_folder(name_or_path: str, subfolder: str = "transformer", revision: str | None = None) -> str:
    """Local folder holding the base transformer's config and weights (downloads only that subfolder)."""
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    else:
        patterns = [f"{subfolder}/*"] if subfolder else None
        root = snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
        folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(
            f"no transformer config.json in {folder!r} (base {name_or_path!r}, subfolder {subfolder!r})."
        )
    return folder


def read_transformer_class(folder: str) -> str:
    """The diffusers class name a transformer folder's config.json declares (SD3 when it names none)."""
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f).get("_class_name", SD3Backbone.transformer_class)


def read_backbone_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def load_base_weights(backbone: DiNaBackbone, folder: str, dtype: torch.dtype | None = None) -> DiNaBackbone:
    """Fill a meta backbone with the base weights it keeps, reading only those tensors from the safetensors files.

    Peak memory stays near the kept weights: the unused blocks of the base are never materialised.
    """
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder!r}.")
    state = {}
    for name in files:
        with safe_open(os.path.join(folder, name), framework="pt") as f:
            for key in f.keys():
                if backbone.keeps(key):
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    expected = set(backbone.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise KeyError(
            f"the base weights in {folder!r} lack {len(missing)} keys the backbone needs, e.g. {missing[:3]}."
        )
    backbone.load_state_dict(state, strict=True, assign=True)
    return backbone
