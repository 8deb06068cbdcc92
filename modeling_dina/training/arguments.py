"""`DiNaTrainingArguments`: `TrainingArguments` plus the preference loss, noise sampling, EMA and evaluation knobs."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from ..configuration_dina import LOSS_FORMS, LOSS_TYPES, NOISE_SAMPLING_SCHEMES

MODEL_CONFIG_FIELDS = (
    "loss_type",
    "loss_form",
    "variance_scale",
    "variance_floor",
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
"""Arguments that mirror `DiNaConfig` fields: None keeps the model config's value, anything else replaces it."""


@dataclass
class DiNaTrainingArguments(TrainingArguments):
    """[`TrainingArguments`] for [`DiNaTrainer`]. Loss and noise-sampling arguments (`MODEL_CONFIG_FIELDS`, documented
    in `DiNaConfig`) left at `None` keep the model config's value; set ones are written into the model config, so a
    saved model records how it was trained. `eval_noise_levels=None` means the config's `ensemble_noise_levels`."""

    loss_type: str | None = field(default=None, metadata={"help": f"Preference loss, one of {LOSS_TYPES}."})
    loss_form: str | None = field(default=None, metadata={"help": f"Thurstone loss form, one of {LOSS_FORMS}."})
    variance_scale: float | None = field(default=None, metadata={"help": "a in var(sigma) = a sigma^2 + b."})
    variance_floor: float | None = field(default=None, metadata={"help": "b in var(sigma) = a sigma^2 + b."})
    constant_variance: float | None = field(default=None, metadata={"help": "Per-item variance, constant Thurstone."})
    bt_margin: float | None = field(default=None, metadata={"help": "Margin of the `bt_margin` loss."})
    noise_sampling: str | None = field(
        default=None,
        metadata={"help": f"Training noise-level scheme, one of {NOISE_SAMPLING_SCHEMES}."},
    )
    logit_mean: float | None = field(default=None, metadata={"help": "Mean of `logit_normal` sampling."})
    logit_std: float | None = field(default=None, metadata={"help": "Std of `logit_normal` sampling."})
    mode_scale: float | None = field(default=None, metadata={"help": "Scale of `mode` sampling."})
    beta_alpha: float | None = field(default=None, metadata={"help": "Alpha of `beta` sampling."})
    beta_beta: float | None = field(default=None, metadata={"help": "Beta of `beta` sampling."})
    power_exponent: float | None = field(default=None, metadata={"help": "Exponent of `power` sampling."})
    constant_noise_level: float | None = field(default=None, metadata={"help": "Level of `constant` sampling."})
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
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"unknown `{name}` {value!r}; expected one of {allowed}.")
        levels = self.eval_noise_levels
        if levels is not None and (not levels or any(not 0.0 <= u <= 1.0 for u in levels)):
            raise ValueError(f"`eval_noise_levels` must be a non-empty list of levels in [0, 1], got {levels}.")


__all__ = ["DiNaTrainingArguments", "MODEL_CONFIG_FIELDS"]
