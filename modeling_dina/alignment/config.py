"""`AlignmentConfig`: every knob of an alignment run (ReFL/DRaFT reward gradient, Flow-GRPO policy gradient or RAFT
reward-ranked fine-tuning)."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import yaml

METHODS = ("refl", "grpo", "raft", "dpo")
KL_TYPES = ("prediction", "weights")


@dataclass
class AlignmentConfig:
    """Configuration of an alignment run.

    Components (used by `run_alignment` and `dina align`; `align` takes loaded objects instead):
        pipeline: diffusers `StableDiffusion3Pipeline` folder of the generator.
        reward: DiNa model folder, or `"pixel"` for `pixel_reward`.
        pixel_reward: `"module:function"` of a pixel reward `fn(images, prompts) -> one number per image`.
        eval_fn: `"module:function"` of an evaluation callback `fn(pipe, step) -> {metric: value}`.
            Both are imported and called: a config naming them is code, to be run only when it is trusted.
        device, dtype: where and in what precision to load them (`dtype` e.g. `"bfloat16"`; default float32).

    Run:
        method: `"refl"` (reward gradient through the last sampling steps), `"grpo"` (policy gradient), `"raft"`
            (reward-ranked fine-tuning: flow-matching on the best of `group_size` samples per prompt,
            `inner_epochs` optimiser steps per batch) or `"dpo"` (online Diffusion-DPO on each prompt's best and
            worst of `group_size` samples, against the frozen base; `dpo_beta` its inverse temperature).
        prompts: a list of prompts or a text file with one per line; each step draws `batch_size` of them.
        steps, learning_rate, weight_decay, max_grad_norm (None: no clipping): the AdamW optimisation.
        batch_size: prompts per step; `group_size` (GRPO): samples per prompt.
        guidance_scale, num_inference_steps, height, width (pixels; default the transformer's native size),
        max_sequence_length (T5 tokens; default the DiNa reward's, else 256), negative_prompt: the sampler.
        lora_rank, lora_alpha, lora_target_modules: the generator LoRA (the only thing trained).
        reward_noise_level: DiNa's noise level(s) for scoring (several = noise ensemble); `reward_scale` multiplies
            the reward in the ReFL loss.
        grad_steps: ReFL: how many of the last model evaluations before scoring carry gradient (DRaFT-K; 1 = only
            the x0 prediction; None = all).
        policy_grad_steps: ReFL: only the first this many of the gradient-carrying model evaluations update the
            LoRA; the later ones pass the reward's gradient back to them with the LoRA held fixed (None: all update
            it). The first sampling steps decide a layout, and the rest of the chain keeps their change on the image
            manifold, while a LoRA trained at the last steps climbs a latent reward along directions no image
            takes (in the Shapes world: reward up, compliance flat).
        reward_step: ReFL: the sampling step (0-based, negative from the end) whose x0 prediction is scored; -1 is
            the final step (the sampler's output). A pair `[lo, hi]` draws it uniformly per step (ReFL).
        kl_weight, kl_type: ReFL's regulariser: `"prediction"` = mean squared difference between the LoRA's and the
            base model's (LoRA disabled) guided velocity on the same inputs, over the gradient-carrying steps;
            `"weights"` = sum of the squared Frobenius norms of the LoRA's weight updates `scale * B @ A`.
            GRPO always uses the KL between its Gaussian transitions and the base model's (Flow-GRPO).
        pretrain_weight, pretrain_batch_size: ReFL and RAFT: weight and batch of the flow-matching ("pretrain") loss
            on real data (`align(..., pretrain_data=...)`), the regulariser of the authors' ReFL recipe; 0 = off.
        gradient_checkpointing: checkpoint the generator transformer's blocks (the reward's are not checkpointed:
            recomputing them in the backward pass would run with the generator's adapter active).
        eta, clip_range, adv_clip_max, inner_epochs: GRPO's SDE noise level, PPO ratio clip (Flow-GRPO's 1e-4: its
            log-probabilities are means over the latent's elements, so ratios stay close to 1), advantage clip and
            optimisation epochs over each batch of trajectories.
        train_timesteps: GRPO: how many SDE transitions per trajectory are trained, a random subset each step (None:
            all).
        share_initial_noise: GRPO: the samples of a prompt's group start from the same noise, so their rewards differ
            only through the SDE's noise, which is what the policy's log-probabilities account for (the starting
            noise is not a decision of the policy: with independent starts most of a group's reward spread is noise
            in the gradient).
        sde_steps: GRPO: how many leading sampling steps use the SDE (explore, are trained); the rest use the ODE
            (None: all steps).
        sde_noise_grid: GRPO: draw the SDE's noise on a `grid x grid` lattice per channel, upsampled (nearest), and
            credit the block means (`sde_step`'s `noise_grid`): exploration in the low-frequency directions where a
            layout is decided, with a score-function noise that shrinks with the explored dimension. None: per
            element (Flow-GRPO).
        advantage_std: GRPO: what a group's centred rewards are divided by: `"group"`, its own std (Flow-GRPO), or
            `"batch"`, one std over the whole batch, so that a group whose samples barely differ (all fail alike)
            gets small advantages rather than its reward noise blown up to full size.
        train_unconditional: GRPO: let the policy gradient reach the LoRA through the unconditional (negative-prompt)
            branch of classifier-free guidance. That branch is the same for every prompt, so its gradient is a sum
            over the batch, a push in one prompt-independent direction; False detaches it (the sampled and trained
            transitions are unchanged).
        fit_guided: RAFT and DPO: fit (DPO: compare) the classifier-free-guided velocity the sampler follows
            (`guidance_scale`) instead of the conditional one. The candidates are guided samples: fitting the
            conditional velocity to them and guiding it again at sampling compounds the guidance every step.
        ema_decay: keep an EMA of the LoRA (the ReFL recipe's policy EMA), evaluated and saved instead of the raw
            weights; None = off.
        early_stopping_metric, early_stopping_patience: stop once the evaluation metric `eval/<metric>` (e.g. a
            validation reward) has not improved for `patience` evaluations; the best evaluated LoRA is the one saved
            (also in `best/`). None = run all steps.
        seed, output_dir, checkpoint_every (0: only the final LoRA), eval_every (0: never).
    """

    pipeline: str | None = None
    reward: str | None = None
    pixel_reward: str | None = None
    eval_fn: str | None = None
    device: str | None = None
    dtype: str | None = None

    method: str = "refl"
    prompts: list[str] | str | None = None
    steps: int = 100
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 4
    group_size: int = 4
    guidance_scale: float = 4.5
    num_inference_steps: int = 20
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    negative_prompt: str = ""
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | None = None  # None: the generator family's (`generator_lora_targets`)

    reward_noise_level: float | list[float] = 0.4
    reward_scale: float = 1.0
    grad_steps: int | None = 1
    policy_grad_steps: int | None = None
    reward_step: int | list[int] = -1
    kl_weight: float = 0.0
    kl_type: str = "prediction"
    pretrain_weight: float = 0.0
    pretrain_batch_size: int = 8
    gradient_checkpointing: bool = False

    eta: float = 0.7
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    inner_epochs: int = 1
    dpo_beta: float = 5000.0
    train_timesteps: int | None = None
    share_initial_noise: bool = False
    sde_steps: int | None = None
    sde_noise_grid: int | None = None
    advantage_std: str = "group"
    train_unconditional: bool = True
    fit_guided: bool = False

    ema_decay: float | None = None
    early_stopping_metric: str | None = None
    early_stopping_patience: int = 3

    seed: int = 0
    output_dir: str = "alignment"
    checkpoint_every: int = 50
    eval_every: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {self.method!r}.")
        if self.advantage_std not in ("group", "batch"):
            raise ValueError(f"`advantage_std` must be 'group' or 'batch', got {self.advantage_std!r}.")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"`kl_type` must be one of {KL_TYPES}, got {self.kl_type!r}.")
        for name in (
            "steps",
            "batch_size",
            "num_inference_steps",
            "inner_epochs",
            "lora_rank",
            "pretrain_batch_size",
            "early_stopping_patience",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        for name in ("checkpoint_every", "eval_every", "kl_weight", "clip_range", "pretrain_weight", "dpo_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        for name in ("grad_steps", "policy_grad_steps", "train_timesteps", "sde_steps", "sde_noise_grid"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1 or None (all), got {getattr(self, name)}.")
        if self.method in ("grpo", "raft", "dpo") and self.group_size < 2:
            raise ValueError(
                f"{self.method} ranks samples per group: `group_size` must be >= 2, got {self.group_size}."
            )
        if self.method == "grpo" and self.eta <= 0:
            raise ValueError(f"GRPO samples with an SDE: `eta` must be > 0, got {self.eta}.")
        if isinstance(self.reward_step, (list, tuple)):
            if len(self.reward_step) != 2 or self.reward_step[0] > self.reward_step[1]:
                raise ValueError(f"`reward_step` as a range must be [lo, hi] with lo <= hi, got {self.reward_step}.")
            self.reward_step = list(self.reward_step)
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"`ema_decay` must be in [0, 1) or None, got {self.ema_decay}.")
        if self.early_stopping_metric and not self.eval_every:
            raise ValueError("early stopping reads the evaluations: set `eval_every` > 0.")
        if self.pretrain_weight > 0 and self.method == "grpo":
            raise ValueError("the flow-matching `pretrain_weight` regularises ReFL and RAFT; GRPO has its KL instead.")
        if self.reward == "pixel" and not self.pixel_reward:
            raise ValueError('`reward: "pixel"` needs `pixel_reward: "module:function"`.')

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AlignmentConfig:
        """Read a YAML or JSON file of config fields; unknown fields are an error."""
        with open(path) as f:
            values = json.load(f) if str(path).endswith(".json") else yaml.safe_load(f)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of config fields, got {type(values).__name__}.")
        return cls.from_dict(values, source=str(path))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> AlignmentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown fields {unknown}; known fields: {sorted(known)}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_prompts(self) -> list[str]:
        """The prompt list (from the file when `prompts` is a path; blank lines skipped)."""
        if self.prompts is None:
            raise ValueError("no `prompts` given.")
        if isinstance(self.prompts, str):
            with open(self.prompts) as f:
                prompts = [line.strip() for line in f if line.strip()]
        else:
            prompts = [str(p) for p in self.prompts]
        if not prompts:
            raise ValueError(f"the prompt source {self.prompts!r} holds no prompts.")
        return prompts
