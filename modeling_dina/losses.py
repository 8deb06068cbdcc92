"""Preference losses (SPEC §2): noise-calibrated Thurstone, constant-variance Thurstone, Bradley-Terry (+ margin).

All take scores of the preferred item `w` and the other item `l` (shape (B,)) and optional soft labels `y` in [0, 1]
(1 = w preferred, 0.5 = tie). Computed in fp32 whatever the scores' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("thurstone", "thurstone_constant", "bt", "bt_margin")
LOSS_FORMS = ("fidelity", "nll")


def thurstone_variance(sigma: torch.Tensor, scale: float = 2.0, floor: float = 0.05) -> torch.Tensor:
    """Utility variance of an image seen at noise level `sigma`: `scale * sigma**2 + floor`."""
    return scale * sigma.float() ** 2 + floor


def preference_probability(
    score_a: torch.Tensor,
    score_b: torch.Tensor,
    var_a: torch.Tensor | float,
    var_b: torch.Tensor | float,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Thurstone `P(a > b) = Phi((s_a - s_b) / sqrt(var_a + var_b + eps))`."""
    diff = score_a.float() - score_b.float()
    std = torch.sqrt(torch.as_tensor(var_a, device=diff.device) + torch.as_tensor(var_b, device=diff.device) + eps)
    return torch.special.ndtr(diff / std)


def _check(score_w: torch.Tensor, score_l: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
    if score_w.shape != score_l.shape:
        raise ValueError(f"scores of the two sides differ in shape: {tuple(score_w.shape)} vs {tuple(score_l.shape)}.")
    if labels is None:
        return None
    labels = torch.as_tensor(labels, dtype=torch.float32, device=score_w.device).expand(score_w.shape)
    if ((labels < 0) | (labels > 1)).any():
        raise ValueError("`labels` must lie in [0, 1] (1 = first item preferred, 0.5 = tie).")
    return labels


def _likelihood_loss(p: torch.Tensor, labels: torch.Tensor | None, form: str, eps: float) -> torch.Tensor:
    """Fidelity `1 - sqrt(p y + eps) - sqrt((1-p)(1-y) + eps)` or NLL, per pair; hard labels give the released form."""
    if form == "fidelity":
        if labels is None:
            return 1.0 - torch.sqrt(p + eps)
        other = torch.where(labels < 1, torch.sqrt((1 - p) * (1 - labels) + eps), torch.zeros_like(p))
        return 1.0 - torch.sqrt(p * labels + eps) - other
    if form == "nll":
        if labels is None:
            return -torch.log(p + eps)
        return -(labels * torch.log(p + eps) + (1 - labels) * torch.log(1 - p + eps))
    raise ValueError(f"unknown loss form {form!r}; expected 'fidelity' or 'nll'.")


def thurstone_loss(
    score_w: torch.Tensor,
    score_l: torch.Tensor,
    sigma_w: torch.Tensor,
    sigma_l: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    variance_scale: float = 2.0,
    variance_floor: float = 0.05,
    form: str = "fidelity",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Noise-calibrated Thurstone loss, mean over the batch. `sigma_l` defaults to `sigma_w` (shared noise level)."""
    labels = _check(score_w, score_l, labels)
    sigma_l = sigma_w if sigma_l is None else sigma_l
    var_w = thurstone_variance(sigma_w, variance_scale, variance_floor)
    var_l = thurstone_variance(sigma_l, variance_scale, variance_floor)
    p = preference_probability(score_w, score_l, var_w, var_l, eps)
    return _likelihood_loss(p, labels, form, eps).mean()


def constant_variance_thurstone_loss(
    score_w: torch.Tensor,
    score_l: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    variance: float = 0.5,
    form: str = "fidelity",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Thurstone loss with the same variance for every item, whatever its noise level (a baseline)."""
    labels = _check(score_w, score_l, labels)
    p = preference_probability(score_w, score_l, variance, variance, eps)
    return _likelihood_loss(p, labels, form, eps).mean()


def bradley_terry_loss(
    score_w: torch.Tensor, score_l: torch.Tensor, labels: torch.Tensor | None = None, *, margin: float = 0.0
) -> torch.Tensor:
    """`-log sigmoid(s_w - s_l - margin)`, mean over the batch; soft labels weigh both directions."""
    labels = _check(score_w, score_l, labels)
    diff = score_w.float() - score_l.float()
    loss = -F.logsigmoid(diff - margin)
    if labels is not None:
        loss = labels * loss - (1 - labels) * F.logsigmoid(-diff - margin)
    return loss.mean()


def preference_loss(
    loss_type: str,
    score_w: torch.Tensor,
    score_l: torch.Tensor,
    sigma: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    loss_form: str = "fidelity",
    variance_scale: float = 2.0,
    variance_floor: float = 0.05,
    constant_variance: float = 0.5,
    bt_margin: float = 1.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Dispatch by `loss_type` (`thurstone`, `thurstone_constant`, `bt`, `bt_margin`) with the config's constants."""
    if loss_type == "thurstone":
        if sigma is None:
            raise ValueError("the noise-calibrated Thurstone loss needs the pairs' noise levels `sigma`.")
        return thurstone_loss(
            score_w,
            score_l,
            sigma,
            labels=labels,
            variance_scale=variance_scale,
            variance_floor=variance_floor,
            form=loss_form,
            eps=eps,
        )
    if loss_type == "thurstone_constant":
        return constant_variance_thurstone_loss(
            score_w, score_l, labels, variance=constant_variance, form=loss_form, eps=eps
        )
    if loss_type == "bt":
        return bradley_terry_loss(score_w, score_l, labels)
    if loss_type == "bt_margin":
        return bradley_terry_loss(score_w, score_l, labels, margin=bt_margin)
    raise ValueError(f"unknown loss type {loss_type!r}.")
