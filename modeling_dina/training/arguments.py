"""`DiNaTrainingArguments`: `TrainingArguments` plus the preference loss, noise sampling, EMA and evaluation knobs
(trl's `RewardConfig` is the model: the model config says what the model is, these say how it is trained)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from ..losses import LOSS_FORMS, LOSS_TYPES
from ..noise import NOISE_SAMPLING_SCHEMES

LOSS_ARGUMENTS = ("loss_type", "loss_form", "variance_scale", "variance_floor", "constant_variance", "bt_margin")
SAMPLING_ARGUMENTS = (
    "logit_mean",
    "logit_std",
    "mode_scale",
    "beta_alpha",
    "beta_beta",
    "power_exponent",
    "constant_noise_level",
)


@dataclass
class DiNaTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] for [`DiNaTrainer`], with the released recipe as defaults (noise-calibrated Thurstone,
    fidelity form, uniform noise levels). `variance_scale`/`variance_floor` left at None use the model config's
    (the variance `compare` is calibrated with). A model whose config predates this split and still carries training
    knobs has them used where these arguments are left at their defaults (`resolve_with`)."""

    loss_type: str = field(default="thurstone", metadata={"help": f"Preference loss, one of {LOSS_TYPES}."})
    loss_form: str = field(default="fidelity", metadata={"help": f"Thurstone loss form, one of {LOSS_FORMS}."})
    variance_scale: float | None = field(
        default=None, metadata={"help": "a in var(sigma) = a sigma^2 + b; None: the model config's."}
    )
    variance_floor: float | None = field(
        default=None, metadata={"help": "b in var(sigma) = a sigma^2 + b; None: the model config's."}
    )
    constant_variance: float = field(default=0.5, metadata={"help": "Per-item variance of constant Thurstone."})
    bt_margin: float = field(default=1.0, metadata={"help": "Margin of the `bt_margin` loss."})
    noise_sampling: str = field(
        default="uniform", metadata={"help": f"Training noise-level scheme, one of {NOISE_SAMPLING_SCHEMES}."}
    )
    logit_mean: float = field(default=0.0, metadata={"help": "Mean of `logit_normal` sampling."})
    logit_std: float = field(default=1.0, metadata={"help": "Std of `logit_normal` sampling."})
    mode_scale: float = field(default=1.29, metadata={"help": "Scale of `mode` sampling."})
    beta_alpha: float = field(default=1.0, metadata={"help": "Alpha of `beta` sampling."})
    beta_beta: float = field(default=1.0, metadata={"help": "Beta of `beta` sampling."})
    power_exponent: float = field(
        default=1.0, metadata={"help": "Exponent of `power` sampling (u = r ** power_exponent, r uniform)."}
    )
    constant_noise_level: float = field(
        default=0.4, metadata={"help": "Level of `constant` sampling (0 = clean-only training)."}
    )
    eval_noise_levels: list[float] | None = field(
        default=None, metadata={"help": "Noise levels scored at evaluation, each alone and as an ensemble."}
    )
    ema_decay: float = field(default=0.0, metadata={"help": "EMA decay of the trainable weights; 0 turns EMA off."})
    num_noise_buckets: int = field(
        default=4, metadata={"help": "Training accuracy is also logged per noise-level bucket of [0, 1]."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Must stay False: the batches are not `model.forward` arguments."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.remove_unused_columns:
            raise ValueError("DiNaTrainer needs `remove_unused_columns=False`: its batches are not forward arguments.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got {self.ema_decay}.")
        if self.num_noise_buckets < 1:
            raise ValueError(f"`num_noise_buckets` must be >= 1, got {self.num_noise_buckets}.")
        for name, allowed in (
            ("loss_type", LOSS_TYPES),
            ("loss_form", LOSS_FORMS),
            ("noise_sampling", NOISE_SAMPLING_SCHEMES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown `{name}` {getattr(self, name)!r}; expected one of {allowed}.")
        if (self.variance_scale is not None and self.variance_scale < 0) or (
            self.variance_floor is not None and self.variance_floor <= 0
        ):
            raise ValueError("`variance_scale` must be >= 0 and `variance_floor` > 0.")
        if self.constant_variance <= 0:
            raise ValueError(f"`constant_variance` must be > 0, got {self.constant_variance}.")
        if not self.power_exponent > 0:
            raise ValueError(f"`power_exponent` must be > 0, got {self.power_exponent}.")
        if not 0.0 <= self.constant_noise_level <= 1.0:
            raise ValueError(f"`constant_noise_level` must lie in [0, 1], got {self.constant_noise_level}.")
        levels = self.eval_noise_levels
        if levels is not None and (not levels or any(not 0.0 <= u <= 1.0 for u in levels)):
            raise ValueError(f"`eval_noise_levels` must be a non-empty list of levels in [0, 1], got {levels}.")

    def resolve_with(self, config) -> dict:
        """The loss and sampling knobs to train `config`'s model with: these arguments, where left at their defaults
        the legacy values of an old config, and the config's calibrated variance where left at None."""
        defaults = {f.name: f.default for f in fields(self)}
        legacy = getattr(config, "legacy_training_values", {})
        values = {}
        for name in (*LOSS_ARGUMENTS, "noise_sampling", *SAMPLING_ARGUMENTS):
            value = getattr(self, name)
            if value is None:
                value = getattr(config, name)
            elif value == defaults[name] and name in legacy:
                value = legacy[name]
            values[name] = value
        return values


__all__ = ["DiNaTrainingArguments", "LOSS_ARGUMENTS", "SAMPLING_ARGUMENTS"]
