"""Configuration of DiNa-LRM: the architecture and inference knobs, with the released SD3.5-M 12-layer values as
defaults. How a model is trained (loss kind, noise sampling) is `DiNaTrainingArguments`' business."""

import math
import warnings
from dataclasses import field, fields

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .backbone_sd3 import SD3_LORA_TARGETS
from .backbones import backbone_class
from .losses import LOSS_FORMS, LOSS_TYPES
from .noise import NOISE_SAMPLING_SCHEMES as SCHEMES

# Far beyond any real model, yet small enough that building one cannot exhaust memory: a config is data, so a hostile
# one is refused before anything is allocated.
SIZE_LIMITS = {
    "num_backbone_layers": 1024,
    "lora_rank": 4096,
    "head_width": 65536,
    "head_feature_width": 65536,
    "head_num_queries": 4096,
    "head_num_attention_heads": 1024,
    "max_sequence_length": 65536,
}
# Training knobs that configs written before the split carried; they still load (values kept as attributes, read
# by `DiNaTrainer` when its arguments leave them at their defaults).
LEGACY_TRAINING_FIELDS = (
    "loss_type",
    "loss_form",
    "constant_variance",
    "bt_margin",
    "noise_sampling",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "beta_alpha",
    "beta_beta",
    "power_exponent",
    "constant_noise_level",
)

# The released backbone: SD3.5-Medium's transformer (its diffusers config; 24 blocks, 0..12 with dual attention).
SD35_MEDIUM_TRANSFORMER_CONFIG = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}


@strict(accept_kwargs=True)
class DiNaConfig(PreTrainedConfig):
    r"""
    Configuration of a [`DiNaRewardModel`]: which base diffusion transformer is read, how deep, where features are
    tapped, the LoRA, the reward head, the inference noise levels, the calibrated variance of `compare` and the score
    normalisation.

    Args:
        base_model_name_or_path (`str`): Hub id or local folder of the diffusers pipeline whose transformer is the
            backbone (its text encoders, VAE and scheduler are used by the pipeline).
        base_model_revision (`str`, *optional*): revision of the base on the Hub.
        base_model_subfolder (`str`): subfolder of the base holding the transformer.
        backbone_type (`str`): which backbone family reads the latents: `"sd3"`, `"flux"`, `"qwenimage"` or
            `"zimage"` (`DiNaRewardModel.from_base` picks it from the base transformer's class).
        backbone_config (`dict`, *optional*): the base transformer's own config. Filled in when the model is built
            from a base, so the architecture can be rebuilt (e.g. on the `meta` device) without downloading.
        base_weights_included (`bool`): the saved weights hold the backbone's own weights (a self-contained folder
            with LoRA merged), so loading needs no base.
        scheduler_config (`dict`, *optional*): the base's flow-matching scheduler config; its training grid is
            where noise levels are snapped (SPEC §1). `None` means `FlowMatchEulerDiscreteScheduler(shift=3.0)`.
        num_backbone_layers (`int`): how many transformer blocks are kept (released: 12 of 24).
        visual_layers (`list[int]`): blocks (1-based, 0 = embedder output) whose image-token stream feeds the head.
        text_layers (`list[int]`): blocks whose text-token stream feeds the head.
        use_lora (`bool`): put LoRA adapters on the backbone (otherwise the backbone is frozen as is).
        lora_rank (`int`), lora_alpha (`float`), lora_init (`str` or `bool`): the LoRA (`"gaussian"` in the release).
        lora_target_modules (`list[str]`): module-name suffixes that get LoRA (`from_base` defaults to the family's:
            the attention projections of both streams for SD3, FLUX and Qwen-Image, `to_q/k/v/out.0` for Z-Image).
        head_width (`int`): reward-head width W; `-1` means the backbone's token width.
        head_feature_width (`int`): width of each per-layer adapter's output; `-1` means W // 4.
        head_num_queries (`int`): learned query tokens.
        head_num_attention_heads (`int`): heads of the head's cross-attention blocks.
        head_dropout (`float`): dropout after attention outputs and the feed-forward.
        head_use_proj_in (`bool`): a learned input projection in each per-layer adapter (identity in the release).
        use_logistic (`bool`): squash the raw reward into (-2, 2) with a learned logistic (off in the release).
        variance_scale (`float`), variance_floor (`float`): `var(sigma) = variance_scale * sigma**2 + variance_floor`,
            the noise-calibrated variance of `compare`'s preference probability (and the default of training).
        loss_eps (`float`): the epsilon inside the square roots and logs of SPEC §2.
        noise_level_latents (`float`): default noise level for latents coming from a generator.
        noise_level_images (`float`): default noise level for clean (decoded or real) images.
        ensemble_noise_levels (`list[float]`): noise levels of the test-time ensemble.
        max_sequence_length (`int`): prompt tokens of the family's text encoding (T5 for SD3 and FLUX, Qwen for
            Qwen-Image and Z-Image; release: 128).
        guidance_scale (`float`): the guidance-embedding input of guidance-distilled bases (FLUX.1-dev: 3.5);
            ignored by bases without a guidance embedding.
        unscaled_time_embedding (`bool`): FLUX only. `False` (correct) feeds the time embedding `sigma * 1000` and
            `guidance * 1000`, as `FluxTransformer2DModel.forward` does; `True` feeds `sigma` and the raw guidance, as
            the authors' FLUX reward code does, for checkpoints trained with it (`dina convert` sets it for them).
        score_offset (`float`), score_scale (`float`): reported score `(raw + offset) / scale`.
    """

    model_type = "dina_lrm"

    base_model_name_or_path: str = "stabilityai/stable-diffusion-3.5-medium"
    base_model_revision: str | None = None
    base_model_subfolder: str = "transformer"
    backbone_type: str = "sd3"
    backbone_config: dict | None = field(default_factory=lambda: dict(SD35_MEDIUM_TRANSFORMER_CONFIG))
    base_weights_included: bool = False
    scheduler_config: dict | None = None
    num_backbone_layers: int = 12
    visual_layers: list[int] = field(default_factory=lambda: [4, 8, 12])
    text_layers: list[int] = field(default_factory=lambda: [4, 8, 12])

    use_lora: bool = True
    lora_rank: int = 64
    lora_alpha: float | int = 128
    lora_init: str | bool = "gaussian"
    lora_target_modules: list[str] = field(default_factory=lambda: list(SD3_LORA_TARGETS))

    head_width: int = -1
    head_feature_width: int = -1
    head_num_queries: int = 4
    head_num_attention_heads: int = 8
    head_dropout: float | int = 0.0
    head_use_proj_in: bool = False
    use_logistic: bool = False

    variance_scale: float | int = 2.0
    variance_floor: float | int = 0.05
    loss_eps: float = 1e-6

    noise_level_latents: float | int = 0.4
    noise_level_images: float | int = 0.1
    ensemble_noise_levels: list[float | int] = field(default_factory=lambda: [0.2, 0.5, 0.7])

    max_sequence_length: int = 128
    guidance_scale: float | int = 3.5
    unscaled_time_embedding: bool = False
    score_offset: float | int = 10.0
    score_scale: float | int = 10.0

    @property
    def token_dim(self) -> int:
        """Width of the backbone's token streams (heads x head dim for the MMDiT families)."""
        if not self.backbone_config:
            raise ValueError("`backbone_config` is not set: build the model from a base or give the base's config.")
        return backbone_class(self.backbone_type).token_width(self.backbone_config)

    @property
    def resolved_head_width(self) -> int:
        return self.token_dim if self.head_width == -1 else self.head_width

    @property
    def resolved_head_feature_width(self) -> int:
        return self.resolved_head_width // 4 if self.head_feature_width == -1 else self.head_feature_width

    @property
    def legacy_training_values(self) -> dict:
        """Training knobs found in a config written before they moved to `DiNaTrainingArguments`."""
        return {name: getattr(self, name) for name in LEGACY_TRAINING_FIELDS if name in self.__dict__}

    def validate_legacy_fields(self):
        """Part of `@strict` validation: old training knobs are kept and announced."""
        legacy = self.legacy_training_values
        for name, allowed in (("loss_type", LOSS_TYPES), ("loss_form", LOSS_FORMS), ("noise_sampling", SCHEMES)):
            if name in legacy and legacy[name] not in allowed:
                raise ValueError(f"unknown `{name}` {legacy[name]!r}; expected one of {allowed}.")
        if legacy:
            warnings.warn(
                f"this config carries training settings {sorted(legacy)}, which now belong to DiNaTrainingArguments; "
                "they are kept, and DiNaTrainer uses them where its arguments are left at their defaults.",
                FutureWarning,
                stacklevel=2,
            )

    def validate_architecture(self):
        """Part of `@strict` validation: every inconsistency gets an error that names the knob."""
        n = self.num_backbone_layers
        if n < 1:
            raise ValueError(f"`num_backbone_layers` must be >= 1, got {n}.")
        family = backbone_class(self.backbone_type)
        if self.backbone_config:
            depth = family.depth(self.backbone_config)
            if depth is not None and n > depth:
                raise ValueError(f"`num_backbone_layers`={n} is beyond the base transformer's depth ({depth} blocks).")
            if family.last_block_drops_text and depth is not None and n == depth and n in self.text_layers:
                raise ValueError(
                    f"`text_layers` contains {n}, but block {n} is the base's last block, which emits no text stream "
                    "(context_pre_only)."
                )
        for name in ("visual_layers", "text_layers"):
            layers = getattr(self, name)
            if name == "visual_layers" and not layers:
                raise ValueError("`visual_layers` must name at least one block.")
            bad = [i for i in layers if not 0 <= i <= n]
            if bad:
                raise ValueError(f"`{name}` has {bad}, outside 0..{n} (the kept depth `num_backbone_layers`).")
            if list(layers) != sorted(set(layers)):
                raise ValueError(f"`{name}` must be strictly increasing, got {list(layers)}.")
        if self.backbone_config:
            width, heads = self.resolved_head_width, self.head_num_attention_heads
            if heads < 1 or width % heads:
                raise ValueError(f"head width {width} is not divisible by `head_num_attention_heads`={heads}.")
            if self.resolved_head_feature_width < 1:
                raise ValueError(f"`head_feature_width` resolves to {self.resolved_head_feature_width}, must be >= 1.")
        if self.head_num_queries < 1:
            raise ValueError(f"`head_num_queries` must be >= 1, got {self.head_num_queries}.")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"`head_dropout` must be in [0, 1), got {self.head_dropout}.")
        if self.use_lora and (self.lora_rank < 1 or not self.lora_target_modules):
            raise ValueError("with `use_lora`, `lora_rank` must be >= 1 and `lora_target_modules` non-empty.")
        if self.variance_scale < 0 or self.variance_floor <= 0:
            raise ValueError("`variance_scale` must be >= 0 and `variance_floor` > 0.")
        levels = {
            "noise_level_latents": [self.noise_level_latents],
            "noise_level_images": [self.noise_level_images],
            "ensemble_noise_levels": list(self.ensemble_noise_levels),
        }
        for name, values in levels.items():
            bad = [v for v in values if not 0.0 <= v <= 1.0]
            if bad:
                raise ValueError(f"`{name}` has {bad}: noise levels must lie in [0, 1].")
        if not self.ensemble_noise_levels:
            raise ValueError("`ensemble_noise_levels` must not be empty.")
        if self.max_sequence_length < 1:
            raise ValueError(f"`max_sequence_length` must be >= 1, got {self.max_sequence_length}.")
        if self.score_scale == 0:
            raise ValueError("`score_scale` must not be 0.")

    def validate_values(self):
        """Part of `@strict` validation (types are checked per field): finite numbers, sizes within `SIZE_LIMITS`."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"`{f.name}` must be a finite number, got {value}.")
        sizes = {name: (getattr(self, name), limit) for name, limit in SIZE_LIMITS.items()}
        if self.backbone_config:
            depth = backbone_class(self.backbone_type).depth(self.backbone_config) or 0
            sizes["backbone_config.num_layers"] = (depth, SIZE_LIMITS["num_backbone_layers"])
            sizes["the backbone's token width"] = (self.token_dim, SIZE_LIMITS["head_width"])
        for name, (value, limit) in sizes.items():
            if not isinstance(value, int) or value > limit:
                raise ValueError(f"`{name}` is {value!r}: must be an integer of at most {limit}.")
        if self.lora_alpha <= 0:
            raise ValueError(f"`lora_alpha` must be > 0, got {self.lora_alpha}.")


__all__ = ["DiNaConfig", "SIZE_LIMITS"]
