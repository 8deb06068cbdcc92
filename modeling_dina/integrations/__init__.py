"""DiNa-LRM inside alignment frameworks, with the exact call signatures they use.

- `flow_grpo`: reward functions for Flow-GRPO / DiffusionNFT's `multi_score` registry (`dina_score(device)`, its latent
  variant, and `dina_score_remote(device)` for a `dina serve` server).
- `verl_omni`: `compute_score(data_source, solution_image, ground_truth, extra_info, **kwargs)` and a native reward
  model class (`model_path`, `device`, `infer`, `close`).

The model comes from an argument or the `DINA_REWARD_MODEL` environment variable (frameworks call these with fixed
arguments), the server from `DINA_REWARD_URL`.
"""

from __future__ import annotations

import os

import torch

from ..pipeline_dina import DiNaRewardPipeline

MODEL_ENV = "DINA_REWARD_MODEL"
URL_ENV = "DINA_REWARD_URL"


def resolve_setting(value: str | None, env: str, what: str) -> str:
    value = value or os.environ.get(env)
    if not value:
        raise ValueError(f"no {what}: pass it, or set the `{env}` environment variable.")
    return value


def load_scoring_pipeline(model: str | None, device=None, dtype=None) -> DiNaRewardPipeline:
    """A pipeline for scoring only (eval, LoRA fused, no progress bars) on `device`."""
    pipe = DiNaRewardPipeline.from_pretrained(resolve_setting(model, MODEL_ENV, "reward model"), dtype=dtype)
    if device is not None:
        pipe = pipe.to(torch.device(device))
    pipe.set_progress_bar_config(disable=True)
    pipe.reward_model.eval()
    if pipe.reward_model.config.use_lora:
        pipe.reward_model.fuse_reward_lora()
    return pipe


__all__ = ["MODEL_ENV", "URL_ENV", "load_scoring_pipeline", "resolve_setting"]
