"""Loading a [`DiNaRewardPipeline`]: from a DiNa model folder or Hub repo (the base's text encoders, VAE and scheduler
come from the base it names), from a saved pipeline, or sharing a loaded generator's components (`from_pipe`)."""

from __future__ import annotations

import os

import torch
from diffusers import DiffusionPipeline
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError

from .backbones import backbone_type_for
from .configuration_dina import DiNaConfig
from .modeling_dina import ADAPTER_NAME, DiNaRewardModel

# The text slots of the reward pipeline, named as the base pipelines name them (SD3 uses all three pairs, FLUX.1 two,
# Qwen-Image and Z-Image one); the backbone's `text_components` say which a family needs.
TEXT_COMPONENTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")


class DiNaPipelineLoaderMixin:
    """`from_pretrained` and `from_pipe` of [`DiNaRewardPipeline`] (a mixin placed before `DiffusionPipeline`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load from a DiNa model folder / Hub repo, or from a folder written by this pipeline's `save_pretrained`.

        For a DiNa model, the reward model is loaded with [`DiNaRewardModel.from_pretrained`] and the text encoders,
        tokenizers, VAE and scheduler come from the base named in its config (`base_model_name_or_path`). Pass any
        component (`vae=...`, `reward_model=...`) to use it instead, or `base_model="folder or id"` to read the base
        from elsewhere (e.g. a local copy). `dtype`/`torch_dtype` and `device_map` work as in diffusers; the VAE stays
        in fp32 unless a dict `dtype` names it.
        """
        name = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(name) and (
            os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1
        ):
            raise FileNotFoundError(
                f"`pretrained_model_name_or_path` {name!r} is neither a folder nor a Hub repo id (`owner/name`)."
            )
        dtype = kwargs.pop("dtype", None)
        dtype = _component_dtypes(dtype if dtype is not None else kwargs.pop("torch_dtype", None))
        if dtype is not None:
            kwargs["dtype"] = dtype
        revision = kwargs.pop("revision", None)
        base_model = kwargs.pop("base_model", None)
        if base_model is not None and not isinstance(base_model, (str, os.PathLike)):
            raise TypeError(
                "`base_model` must be a folder or Hub id here; to share a loaded generator use `from_pipe`."
            )
        base_model = os.fspath(base_model) if base_model is not None else None
        saved_pipeline = _is_pipeline_folder(name, revision)
        reward_model = kwargs.pop("reward_model", None)
        if reward_model is None:
            device_map = kwargs.get("device_map")
            reward_model = DiNaRewardModel.from_pretrained(
                name,
                subfolder="reward_model" if saved_pipeline else "",
                base_model=base_model,
                dtype=dtype.get("reward_model", dtype.get("default")) if dtype is not None else None,
                device_map=_accelerator() if device_map == "balanced" else device_map,
                revision=revision,
            )
        if saved_pipeline:
            return super().from_pretrained(name, reward_model=reward_model, revision=revision, **kwargs)
        # Where the reward model found its base (a relative base resolves against the model folder), else as named.
        base = base_model or reward_model.base_location or reward_model.config.base_model_name_or_path
        if not base:
            raise ValueError(
                f"the reward model {name!r} names no base (empty `base_model_name_or_path`): pass `base_model`."
            )
        pipe = super().from_pretrained(
            base, reward_model=reward_model, revision=reward_model.config.base_model_revision, **kwargs
        )
        pipe.register_to_config(_name_or_path=name)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, reward_model=None, **kwargs):
        """Share a generator's text encoders, tokenizers, VAE and scheduler (no copy) with a reward pipeline.

        Args:
            pipeline: a `StableDiffusion3Pipeline`, `FluxPipeline`, `QwenImagePipeline` or `ZImagePipeline` (or any
                pipeline with the same components and a `transformer`) of the reward model's family.
            reward_model: a loaded [`DiNaRewardModel`], or a [`DiNaConfig`] / DiNa folder, built on
                `pipeline.transformer` so that the backbone's frozen blocks ARE the generator's (its own LoRA is
                switched on only while scoring, the generator's output is unchanged).
            kwargs: components to use instead of the generator's (e.g. `vae=...`).
        """
        # Not diffusers' `from_pipe`: it casts every component (shared with the generator!) to fp32 by default.
        if reward_model is None:
            raise ValueError("`reward_model` is required: a DiNaRewardModel, a DiNaConfig or a DiNa folder.")
        transformer = getattr(pipeline, "transformer", None)
        if isinstance(reward_model, (DiNaConfig, str, os.PathLike)):
            if transformer is None:
                raise ValueError("`pipeline` has no `transformer` to build the reward model on.")
            if any(ADAPTER_NAME in getattr(module, "lora_A", {}) for module in transformer.modules()):
                # A second build would silently replace the first reward model's LoRA in the shared blocks.
                raise ValueError(
                    "`pipeline.transformer` already carries a DiNa reward adapter: pass the DiNaRewardModel built on "
                    "it as `reward_model` instead of building another one."
                )
            if isinstance(reward_model, DiNaConfig):
                extra = {}
                if reward_model.scheduler_config is None and getattr(pipeline, "scheduler", None) is not None:
                    extra["scheduler_config"] = {k: v for k, v in pipeline.scheduler.config.items() if k[0] != "_"}
                reward_model = DiNaRewardModel.from_base(transformer, reward_model, **extra)
            else:
                reward_model = DiNaRewardModel.from_pretrained(reward_model, base_model=transformer)
            # LoRA and head follow the generator; for the shared blocks this is a no-op (same device and dtype).
            reward_model = reward_model.to(device=transformer.device, dtype=transformer.dtype).eval()
        elif not isinstance(reward_model, DiNaRewardModel):
            raise TypeError(
                f"`reward_model` must be a DiNaRewardModel, DiNaConfig or folder, got {type(reward_model).__name__}."
            )
        if transformer is not None and backbone_type_for(type(transformer)) != reward_model.config.backbone_type:
            raise ValueError(
                f"`pipeline` is a {backbone_type_for(type(transformer))} generator; the reward model reads "
                f"{reward_model.config.backbone_type} latents and prompts."
            )
        components = {name: getattr(pipeline, name, None) for name in ("scheduler", "vae", *TEXT_COMPONENTS)}
        unknown = sorted(set(kwargs) - set(components))
        if unknown:
            raise TypeError(f"unexpected arguments {unknown}; components are {sorted(components)}.")
        pipe = cls(reward_model=reward_model, **{**components, **kwargs})
        if getattr(pipeline.config, "_name_or_path", None):
            pipe.register_to_config(_name_or_path=pipeline.config._name_or_path)
        return pipe


def _component_dtypes(dtype):
    """A diffusers `dtype` argument with the VAE in fp32 unless named (precision of the latents matters)."""
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"`dtype` {dtype!r} is not a torch dtype name (e.g. 'bfloat16').")
        dtype = getattr(torch, dtype)
    if dtype == "auto":
        dtype = None
    if dtype is None:
        return None
    if isinstance(dtype, dict):
        return {"vae": torch.float32, **dtype}
    return {"default": dtype, "vae": torch.float32}


def _is_pipeline_folder(name: str, revision: str | None) -> bool:
    """A folder written by a pipeline's `save_pretrained` (has `model_index.json`), as opposed to a DiNa model."""
    if os.path.isdir(name):
        return os.path.isfile(os.path.join(name, "model_index.json"))
    try:
        hf_hub_download(name, "model_index.json", revision=revision)
    except EntryNotFoundError:
        return False
    return True


def _accelerator() -> torch.device | None:
    accelerator = torch.accelerator.current_accelerator()
    return torch.device(accelerator.type, 0) if accelerator is not None else None
