"""Import of the released checkpoint layout (SPEC §5) into a `DiNaRewardModel` folder.

The authors' SD3.5-M, FLUX.1-dev and Z-Image-Turbo reward models are written by one training engine, so they share
this layout; their LoRA keys are relative to a backbone module holding the same names as ours (`transformer_blocks`
for SD3 and FLUX, `layers`, `noise_refiner` and `context_refiner` for Z-Image). Their FLUX code feeds the time
embedding unscaled (`sigma`, guidance 3.5), so FLUX checkpoints are imported with `unscaled_time_embedding=True`.

Released layout::

    config.json                                   training config: `model` and `training` sections
    checkpoint/backbone_lora/adapter_config.json  a PEFT adapter on the backbone module
    checkpoint/backbone_lora/adapter_model.safetensors
    checkpoint/rm_head.pt                         the head's state dict (pickled; loaded with weights_only=True)
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import load_file

from .backbones import backbone_type_for, read_transformer_class, resolve_base_folder
from .modeling_dina import DiNaRewardModel
from .modeling_loading import _check_keys

LORA_DIR = os.path.join("checkpoint", "backbone_lora")
HEAD_FILE = os.path.join("checkpoint", "rm_head.pt")
PEFT_PREFIX = "base_model.model."


def released_config_to_kwargs(released: dict) -> dict:
    """`DiNaConfig` keyword arguments from the released training config's `model` section."""
    if "model" not in released:
        raise KeyError("the released config.json has no `model` section.")
    model = released["model"]
    head = model.get("reward_head", {})
    lora = model.get("lora_config") or {}
    if head.get("out_dim", 1) != 1:
        raise ValueError(f"reward_head.out_dim={head['out_dim']}: only scalar rewards (1) are supported.")
    use_lora = bool(model.get("use_lora", True)) and not model.get("freeze_backbone", False)
    kwargs = {
        "num_backbone_layers": model["num_transformer_layers"],
        "visual_layers": list(model["visual_head_idx"]),
        "text_layers": list(model.get("text_head_idx") or []),
        "use_lora": use_lora,
        "head_width": head.get("width", -1),
        "head_num_queries": head.get("num_queries", 4),
        "head_num_attention_heads": head.get("num_attn_heads", 8),
        "head_dropout": head.get("dropout", 0.0),
        "head_use_proj_in": head.get("use_proj_in", False),
        "use_logistic": bool(model.get("use_logistic", False)),
    }
    if head.get("t_emb_dim", -1) > 0:
        kwargs["head_temb_dim"] = head["t_emb_dim"]
    if use_lora:
        kwargs.update(
            lora_rank=lora.get("r", 64),
            lora_alpha=lora.get("lora_alpha", 128),
            lora_init=lora.get("init_lora_weights", "gaussian"),
        )
    return kwargs


def _require(path: str) -> str:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"released checkpoint is missing {path!r}.")
    return path


def _load_head(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"{path!r} is not a plain tensor state dict (loaded with weights_only=True): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path!r} does not hold a state dict of tensors.")
    return state


def _base_family(base, subfolder: str = "transformer") -> str:
    if isinstance(base, str):
        return backbone_type_for(read_transformer_class(resolve_base_folder(base, subfolder)))
    return backbone_type_for(type(base))


def _load_lora(path: str, num_layers: int) -> dict[str, torch.Tensor]:
    state = load_file(path)
    converted = {}
    for key, tensor in state.items():
        if not key.startswith(PEFT_PREFIX):
            raise KeyError(f"{path!r}: key {key!r} does not start with {PEFT_PREFIX!r}.")
        key = key[len(PEFT_PREFIX) :]
        block = re.match(r"(?:transformer_blocks|layers)\.(\d+)\.", key)
        if block and int(block.group(1)) >= num_layers:
            raise KeyError(
                f"{path!r}: key {key!r} is for block {block.group(1)}, but the config keeps {num_layers} blocks: "
                "the adapter was trained for a different depth."
            )
        converted[f"backbone.{key}"] = tensor
    return converted


def convert_released_checkpoint(
    released_dir: str,
    base,
    output_dir: str | None = None,
    *,
    dtype: torch.dtype | None = None,
    **config_overrides,
) -> DiNaRewardModel:
    """Build the released model on `base` (a diffusers SD3, FLUX or Z-Image pipeline folder, Hub id or loaded
    transformer), load its LoRA and head, and (if `output_dir` is given) save it as a DiNa folder that
    `DiNaRewardModel.from_pretrained` loads."""
    config_path = _require(os.path.join(released_dir, "config.json"))
    lora_config_path = os.path.join(released_dir, LORA_DIR, "adapter_config.json")
    lora_path = os.path.join(released_dir, LORA_DIR, "adapter_model.safetensors")
    head_path = _require(os.path.join(released_dir, HEAD_FILE))
    with open(config_path) as f:
        released = json.load(f)
    kwargs = released_config_to_kwargs(released)
    head_temb_dim = kwargs.pop("head_temb_dim", None)
    if _base_family(base) == "flux":
        kwargs["unscaled_time_embedding"] = True  # how the authors' FLUX reward code embeds sigma and guidance
    kwargs.update(config_overrides)
    if kwargs["use_lora"]:
        with open(_require(lora_config_path)) as f:
            adapter = json.load(f)
        _require(lora_path)
        for ours, theirs in (("lora_rank", "r"), ("lora_alpha", "lora_alpha")):
            if theirs in adapter and adapter[theirs] != kwargs[ours]:
                raise ValueError(
                    f"{lora_config_path!r}: {theirs}={adapter[theirs]} but config.json says {kwargs[ours]}."
                )

    model = DiNaRewardModel.from_base(base, dtype=dtype, **kwargs)
    if head_temb_dim is not None and head_temb_dim != model.backbone.temb_dim:
        raise ValueError(
            f"the released head reads a time embedding of width {head_temb_dim}; the {model.config.backbone_type} "
            f"backbone gives {model.backbone.temb_dim}: the checkpoint is for another base."
        )
    head = {f"reward_head.{k}": v for k, v in _load_head(head_path).items()}
    if model.config.use_logistic:
        raise NotImplementedError("the released checkpoint enables `use_logistic`, whose parameters it does not ship.")
    lora = _load_lora(lora_path, model.config.num_backbone_layers) if model.config.use_lora else {}
    expected = model.trainable_state_dict()
    _check_keys({k: v for k, v in expected.items() if k.startswith("reward_head.")}, head, head_path)
    _check_keys({k: v for k, v in expected.items() if k.startswith("backbone.")}, lora, lora_path)
    state = {**head, **lora}
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_trainable_state_dict(state, source=released_dir)
    if output_dir is not None:
        model.save_pretrained(output_dir)
    return model.eval()
