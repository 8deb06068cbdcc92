"""Building, saving and loading a [`DiNaRewardModel`] (the I/O the model itself leaves out): from a base pipeline or
transformer, the trainable state (LoRA + head), `save_pretrained` (atomic, with a manifest) and `from_pretrained`
(config and weights header checked before anything is read)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import StrictDataclassError
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.dynamic_module_utils import custom_object_save

from .backbones import (
    backbone_class,
    backbone_options,
    backbone_type_for,
    build_backbone,
    load_base_weights,
    read_backbone_config,
    read_transformer_class,
    resolve_base_folder,
)
from .configuration_dina import DiNaConfig
from .safe_files import fsync_path, write_json_atomic

ADAPTER_NAME = "dina_reward"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_NAME = "save_manifest.json"
TMP_SAVE_PREFIX = ".tmp-save-"


class DiNaLoadingMixin:
    """`from_base`, the trainable state dicts, `save_pretrained` and `from_pretrained` of [`DiNaRewardModel`] (a mixin
    placed before `PreTrainedModel`)."""

    @classmethod
    def from_base(
        cls,
        base,
        config: DiNaConfig | None = None,
        *,
        subfolder: str = "transformer",
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        **config_kwargs,
    ):
        """A fresh DiNa-LRM (new LoRA and head) on a base.

        Args:
            base: a loaded `SD3Transformer2DModel`, `FluxTransformer2DModel`, `QwenImageTransformer2DModel` or
                `ZImageTransformer2DModel` (its modules are shared, not copied: the generator and the reward hold one
                copy of the frozen blocks), or a diffusers pipeline folder / Hub id (only the kept blocks' weights are
                read from disk). The backbone family follows the transformer's class.
            config: a `DiNaConfig`; else one is made from `config_kwargs` with the released defaults (and the family's
                default LoRA targets).
        """
        if isinstance(base, str):
            folder = resolve_base_folder(base, subfolder, revision)
            backbone_type = backbone_type_for(read_transformer_class(folder))
            backbone_config = read_backbone_config(folder)
            scheduler_config = _read_scheduler_config(base, revision)
            config_kwargs.setdefault("base_model_name_or_path", base)
            config_kwargs.setdefault("base_model_revision", revision)
        else:
            folder, backbone_config, scheduler_config = None, dict(base.config), None
            backbone_type = backbone_type_for(type(base))
            config_kwargs.setdefault("base_model_name_or_path", getattr(base.config, "_name_or_path", "") or "")
        backbone_config = {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in backbone_config.items() if not k.startswith("_")
        }
        family = {"backbone_config": backbone_config, "backbone_type": backbone_type}
        if config is None:
            config_kwargs.setdefault("scheduler_config", scheduler_config)
            config_kwargs.setdefault("lora_target_modules", list(backbone_class(backbone_type).default_lora_targets))
            config = DiNaConfig(**family, base_model_subfolder=subfolder, **config_kwargs)
        else:
            if config.backbone_type != backbone_type:
                raise ValueError(
                    f"the config is for a {config.backbone_type!r} backbone, but the base is a {backbone_type!r} "
                    "transformer: give the base the model was trained on."
                )
            config = DiNaConfig(**{**config.to_dict(), **family, **config_kwargs})
        if folder is None:
            backbone = backbone_class(config.backbone_type).from_transformer(
                base, config.num_backbone_layers, config.visual_layers, config.text_layers, backbone_options(config)
            )
        else:
            with torch.device("meta"):
                backbone = build_backbone(config)
            load_base_weights(backbone, folder, dtype)
        model = cls(config, backbone=backbone)
        return model.to(dtype) if dtype is not None else model

    # ----------------------------------------------------------------------------------------------- save / load

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What is not the base: the LoRA (peft key names) and the head, with model-level prefixes."""
        state = {f"reward_head.{k}": v for k, v in self.reward_head.state_dict().items()}
        if self.config.use_lora:
            lora = self._reward_lora_state_dict()
            state.update({f"backbone.{k}": v for k, v in lora.items()})
        return state

    def _reward_lora_state_dict(self) -> dict[str, torch.Tensor]:
        # peft only filters out adapters it was told about; a generator's own LoRA on shared blocks is not one.
        ours = {k: v for k, v in self.backbone.state_dict().items() if f".{ADAPTER_NAME}." in k}
        return get_peft_model_state_dict(self.backbone, state_dict=ours, adapter_name=ADAPTER_NAME)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Load LoRA + head; any missing or unexpected key is an error naming the key and the source."""
        head = {k[len("reward_head.") :]: v for k, v in state.items() if k.startswith("reward_head.")}
        lora = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        other = sorted(set(state) - {f"reward_head.{k}" for k in head} - {f"backbone.{k}" for k in lora})
        if other:
            raise KeyError(f"{source}: unexpected keys {other[:5]}.")
        _check_keys(self.reward_head.state_dict(), head, f"{source} (reward head)")
        self.reward_head.load_state_dict(head, strict=True)
        if self.config.use_lora:
            expected = self._reward_lora_state_dict()
            _check_keys(expected, lora, f"{source} (backbone LoRA)")
            set_peft_model_state_dict(self.backbone, lora, adapter_name=ADAPTER_NAME)
        elif lora:
            raise KeyError(f"{source}: LoRA keys {sorted(lora)[:3]} but the config has `use_lora=False`.")

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Backbone with the LoRA folded into its weights (plain base key names) + head: a self-contained model."""
        backbone = {}
        with torch.no_grad():
            for name, tensor in self.backbone.state_dict().items():
                if "lora_" in name:
                    continue
                module_name, _, leaf = name.rpartition(".")
                if module_name.endswith(".base_layer"):
                    layer = self.backbone.get_submodule(module_name[: -len(".base_layer")])
                    fused = isinstance(layer, LoraLayer) and layer.merged  # the delta is already in the weight
                    if leaf == "weight" and isinstance(layer, LoraLayer) and ADAPTER_NAME in layer.lora_A and not fused:
                        tensor = tensor + layer.get_delta_weight(ADAPTER_NAME).to(tensor.dtype)
                    name = f"{module_name[: -len('.base_layer')]}.{leaf}"
                backbone[f"backbone.{name}"] = tensor
        head = {f"reward_head.{k}": v for k, v in self.reward_head.state_dict().items()}
        return {**backbone, **head}

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        merged: bool = False,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        **kwargs,
    ) -> None:
        """Write `config.json` + `model.safetensors` holding only LoRA + head (megabytes; the base is named in the
        config), or with `merged=True` a self-contained folder (LoRA folded into the kept blocks).

        Files are written to a temporary folder, then moved in: `save_manifest.json` first (naming a fresh save id,
        also stored in the weights' header), the weights last. Until the last move the weights disagree with the
        manifest and `from_pretrained` refuses the folder, so a save interrupted over an existing model never loads
        as a mix of the two. Temporary folders left by a killed save are removed."""
        if not is_main_process:
            return
        save_directory = str(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"`save_directory` {save_directory!r} is a file, not a folder.")
        os.makedirs(save_directory, exist_ok=True)
        for name in os.listdir(save_directory):
            if name.startswith(TMP_SAVE_PREFIX):
                shutil.rmtree(os.path.join(save_directory, name), ignore_errors=True)
        config = DiNaConfig(**self.config.to_dict())
        if merged or self.config.base_weights_included:
            state, config.use_lora, config.base_weights_included = self.merged_state_dict(), False, True
        else:
            state = self.trainable_state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_id = uuid.uuid4().hex
        with tempfile.TemporaryDirectory(dir=save_directory, prefix=TMP_SAVE_PREFIX) as tmp:
            config.save_pretrained(tmp)
            save_file(state, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt", "save_id": save_id})
            if self._auto_class is not None:
                custom_object_save(self, tmp, config=config)
                with open(os.path.join(tmp, "config.json")) as f:
                    saved = json.load(f)
                saved["auto_map"] = {
                    "AutoConfig": "configuration_dina.DiNaConfig",
                    "AutoModel": "modeling_dina.DiNaRewardModel",
                }
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    json.dump(saved, f, indent=2, sort_keys=True)
            write_json_atomic(os.path.join(tmp, MANIFEST_NAME), {"save_id": save_id, "weights": WEIGHTS_NAME})
            others = sorted(set(os.listdir(tmp)) - {MANIFEST_NAME, WEIGHTS_NAME})
            for name in [MANIFEST_NAME, *others, WEIGHTS_NAME]:
                os.replace(os.path.join(tmp, name), os.path.join(save_directory, name))
            fsync_path(save_directory)
        if push_to_hub:
            self.push_to_hub(kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory))), **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args,
        base_model=None,
        dtype: torch.dtype | str | None = None,
        device_map: str | torch.device | None = None,
        revision: str | None = None,
        subfolder: str = "",
        **kwargs,
    ):
        """Load a DiNa folder or Hub repo written by `save_pretrained`.

        Args:
            base_model: override the base named in the config: a loaded transformer of its family (shared, not copied)
                or a pipeline folder / Hub id. Ignored for self-contained (merged) folders.
            dtype: e.g. `torch.bfloat16` (or `"bfloat16"`); the head and LoRA follow it.
            device_map: a single device (`"cuda"`, `"cpu"`, `torch.device`) to put the model on.
        """
        for ignored in ("trust_remote_code", "config", "_from_auto", "_from_pipeline", "adapter_kwargs"):
            kwargs.pop(ignored, None)
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        dtype = None if dtype == "auto" else dtype
        folder = _resolve_model_folder(str(pretrained_model_name_or_path), subfolder, revision)
        try:
            config = DiNaConfig.from_pretrained(folder, **kwargs)
        except StrictDataclassError as err:  # types, ranges, size limits: name the file as well as the key
            raise ValueError(f"{os.path.join(folder, 'config.json')}: {err}") from err
        weights = os.path.join(folder, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            pickles = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = (
                f" It holds pickled files {pickles}: import a released checkpoint with `dina convert`."
                if pickles
                else ""
            )
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {folder!r}.{hint}")
        _check_manifest(folder, weights)
        # The config is validated (types, ranges, size limits); the file's header must match it before a weight is
        # read or a module allocated: the model is built on `meta` (no memory) to know what to expect.
        header = _read_header(weights)
        if config.backbone_config or config.base_weights_included:
            with torch.device("meta"):
                skeleton = cls(config)
            expected = skeleton.state_dict() if config.base_weights_included else skeleton.trainable_state_dict()
            _check_keys(expected, header, weights)
        try:
            state = load_file(weights)
        except Exception as err:
            raise OSError(f"{weights!r} is not a readable safetensors file: {err}") from err
        not_finite = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
        if not_finite:
            raise ValueError(f"{weights}: weights {not_finite[:5]} hold NaN or infinite values.")

        if config.base_weights_included:
            model = skeleton
            model.load_state_dict(state, strict=True, assign=True)
        else:
            base = base_model if base_model is not None else resolve_base(config.base_model_name_or_path, folder)
            model = cls.from_base(
                base, config, subfolder=config.base_model_subfolder, revision=config.base_model_revision, dtype=dtype
            )
            model.load_trainable_state_dict(state, source=weights)
            # The config keeps naming the base as saved; where it was found is kept for the pipeline's components.
            model.config.base_model_name_or_path = config.base_model_name_or_path
            model.base_location = base if isinstance(base, str) else None
        if dtype is not None:
            model = model.to(dtype)
        if device_map is not None:
            model = model.to(device_map)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        return model.eval()


def resolve_base(base: str, model_folder: str) -> str:
    """A base given as a path relative to the model folder (e.g. `../generator`, so a model and its base can move
    together) resolves against that folder; anything else (Hub id, absolute or working-directory path) is kept."""
    candidate = os.path.normpath(os.path.join(model_folder, base))
    if base and not os.path.isabs(base) and not os.path.isdir(base) and os.path.isdir(candidate):
        return candidate
    return base


_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _check_manifest(folder: str, weights: str) -> None:
    """Refuse a folder whose weights are not those its `save_manifest.json` names (a save over it was interrupted).
    Folders without a manifest (written before it existed, or by other tools) load as before."""
    path = os.path.join(folder, MANIFEST_NAME)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        manifest = json.load(f)
    try:
        with safe_open(weights, framework="pt") as f:
            found = (f.metadata() or {}).get("save_id")
    except Exception as err:
        raise OSError(f"{weights!r} is not a readable safetensors file: {err}") from err
    if found != manifest.get("save_id"):
        raise ValueError(
            f"{folder!r} holds parts of two saves: its weights are not those {MANIFEST_NAME} names (a save over it "
            "was interrupted, or the weights were replaced by hand). Save the model there again, or delete "
            f"{MANIFEST_NAME} to load the folder as it is."
        )


def _read_header(path: str) -> dict[str, torch.Tensor]:
    """The tensors a safetensors file declares, as `meta` tensors of their shapes (nothing read but the header);
    weights that are not floating point are refused, not cast."""
    try:
        with safe_open(path, framework="pt") as f:
            declared = {key: (f.get_slice(key).get_shape(), f.get_slice(key).get_dtype()) for key in f.keys()}
    except Exception as err:
        raise OSError(f"{path!r} is not a readable safetensors file: {err}") from err
    not_float = {key: dtype for key, (_, dtype) in declared.items() if dtype not in _FLOAT_DTYPES}
    if not_float:
        raise ValueError(f"{path}: weights must be floating point; {dict(list(not_float.items())[:5])} are not.")
    return {key: torch.empty(shape, device="meta") for key, (shape, _) in declared.items()}


def _check_keys(expected: dict, given: dict, source: str) -> None:
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{source}: missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}."
        )
    for key, tensor in given.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}."
            )


def _resolve_model_folder(name_or_path: str, subfolder: str, revision: str | None) -> str:
    if os.path.isdir(name_or_path):
        folder = os.path.join(name_or_path, subfolder) if subfolder else name_or_path
    else:
        root = snapshot_download(name_or_path, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.py"])
        folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"no config.json in {folder!r}: not a DiNa model folder.")
    return folder


def _read_scheduler_config(base: str, revision: str | None) -> dict | None:
    """The base pipeline's scheduler config, if it ships one (its training grid is where noise levels snap)."""
    root = base if os.path.isdir(base) else snapshot_download(base, revision=revision, allow_patterns=["scheduler/*"])
    path = os.path.join(root, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


__all__ = ["ADAPTER_NAME", "WEIGHTS_NAME", "DiNaLoadingMixin", "resolve_base"]
