"""Alignment in the Shapes world: ReFL, GRPO or RAFT fine-tuning of the shipped generator's LoRA against DiNa-LRM
(latent space, one shared copy of the base blocks), the pixel-space reward of the report (VAE decode first) or the
exact checker (decode + checker: the known-good reward that tests the loop), with the checker's prompt compliance on
held-out prompts — which no reward sees — measured before, during and after.

    python -m modeling_dina.shapes.align --reward dina --output runs/align-dina
    python -m modeling_dina.shapes.align --reward checker --output runs/grpo-checker --set method=grpo steps=60
    python -m modeling_dina.shapes.align --reward pixel --pixel-model BUILD/rewards/pixel --output runs/align-pixel

`--set FIELD=VALUE` sets any `AlignmentConfig` field (values read as JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..alignment import AlignmentConfig, DiNaLatentReward, align, encode_prompts, make_pixel_reward_fn
from ..alignment.refresh import RewardRefresh
from ..modeling_dina import DiNaRewardModel
from .checker import check_many
from .data import split_prompts
from .generator import MAX_SEQUENCE_LENGTH, _latent_pool, evaluate_generator, load_generator, sample_images
from .grammar import alternate_kinds, group_by_kind
from .report import held_out_prompts
from .reward import REWARD_DIR, PixelReward, load_pixel_reward

__all__ = ["PixelLatentReward", "checker_reward", "run_shapes_alignment"]


def checker_reward(images, prompts) -> list[float]:
    """The exact checker as a pixel reward: the fraction of the prompt's attributes an image satisfies, plus one when
    all hold (so a complying sample always outranks a near miss). Not differentiable: for GRPO."""
    rewards = []
    for result in check_many(prompts, images):
        held = [v for a, v in result.as_dict().items() if a != "overall" and v is not None]
        rewards.append(sum(held) / len(held) + result.overall)
    return rewards


class PixelLatentReward:
    """The pixel-space reward as a differentiable latent reward: VAE decode (with gradients), then the pixel model
    on the decoded pixels and the generator's own pooled prompt embedding."""

    def __init__(self, vae, model: PixelReward):
        self.vae, self.model = vae, model

    def __call__(self, latents, prompt_embeds, pooled_prompt_embeds):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(z).sample.clamp(-1, 1)
        return self.model(pixels.float(), pooled_prompt_embeds.float())


SHAPES_SAMPLER = dict(guidance_scale=3.0, num_inference_steps=20, max_sequence_length=MAX_SEQUENCE_LENGTH)


def make_reward(pipe, reward: str, *, pixel_model=None, noise_level=None, seed: int = 0):
    """The reward callable: `"dina"` (shipped DiNa-LRM on the generator's own blocks, at `noise_level`, default its
    config's level for latents), `"pixel"` (VAE decode + the pixel model at `pixel_model`) or `"checker"`."""
    if reward == "dina":
        # Built on the generator's own transformer: one copy of the base blocks, the reward LoRA on only while scoring.
        model = DiNaRewardModel.from_pretrained(REWARD_DIR, base_model=pipe.transformer)
        return DiNaLatentReward(model, noise_level or model.config.noise_level_latents, seed=seed)
    if reward == "pixel":
        if pixel_model is None:
            raise ValueError("the pixel reward needs `pixel_model`, the folder the build's rewards stage wrote.")
        return PixelLatentReward(pipe.vae, load_pixel_reward(pixel_model))
    if reward == "checker":
        return make_pixel_reward_fn(pipe, checker_reward)
    raise ValueError(f"reward must be 'dina', 'pixel' or 'checker', got {reward!r}")


def training_prompts(balanced: bool = False) -> list[str]:
    """The train-split prompts; `balanced`: each kind cycled to the larger kind's size, so that a uniform draw picks
    count and relation prompts equally often (as the held-out evaluation weighs them), every prompt kept."""
    train = split_prompts()["train"]
    if not balanced:
        return train
    return alternate_kinds(train, 2 * max(len(group) for group in group_by_kind(train)))


def evaluation_fn(
    num_samples: int,
    reward_fn=None,
    validation_samples: int = 64,
    seed: int = 10_000,
    skip_start: bool = False,
    validation_compliance: bool = False,
):
    """`fn(pipe, step)`: the checker's compliance (with its 95 % Wilson interval) of one ODE sample per prompt over
    `num_samples` held-out (test-split) prompts, fixed seeds; with a differentiable latent `reward_fn` also its mean
    on `validation_samples` ODE samples of validation-split prompts (fixed noise): the early-stopping signal, which
    never sees the test prompts. `skip_start`: nothing at step 0 (the shipped generator's figures do not change).
    `validation_compliance`: also the checker's compliance over `num_samples` draws of validation-split prompts
    (other seeds): a model-selection signal that, like the reward refresh's labels, never sees a test prompt."""
    prompts = held_out_prompts(num_samples)
    validation_split = split_prompts()["validation"]
    validation = alternate_kinds(validation_split, validation_samples)

    def evaluate(pipe, step):
        if skip_start and step == 0:
            return {}
        rates = evaluate_generator(pipe, prompts, num_samples=num_samples, best_of=1, seed=seed)["random"]
        low, high = wilson_interval(rates["overall"], num_samples)
        metrics = {"compliance": rates["overall"], "compliance_low": low, "compliance_high": high}
        metrics.update(count=rates["count"], position=rates["position"])
        if validation_compliance:
            draws = evaluate_generator(pipe, validation_split, num_samples=num_samples, best_of=1, seed=2 * seed)
            metrics["validation_compliance"] = draws["random"]["overall"]
        if reward_fn is not None:
            metrics["validation_reward"] = validation_reward(pipe, reward_fn, validation, seed)
        return metrics

    return evaluate


@torch.no_grad()
def validation_reward(pipe, reward_fn, prompts: list[str], seed: int) -> float:
    """Mean latent reward of ODE samples of `prompts` (the scoring noise drawn from `seed`, the same every call)."""
    latents = sample_images(pipe, prompts, seed=seed, output_type="latent")
    cond = encode_prompts(pipe, prompts, guidance_scale=1.0, max_sequence_length=MAX_SEQUENCE_LENGTH)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed)).to(latents)
    kwargs = {"noise": noise} if isinstance(reward_fn, DiNaLatentReward) else {}
    return reward_fn(latents, cond.prompt_embeds, cond.pooled_prompt_embeds, **kwargs).mean().item()


def real_data(prompts: list[str], per_prompt: int = 4, seed: int = 0):
    """ReFL's real data: VAE latents of `per_prompt` compliant renders of each prompt, as `pretrain_data`
    (`fn(batch_size, generator) -> (latents, prompts)`)."""
    vae = load_generator().vae
    latents, index = _latent_pool(vae, prompts, [per_prompt] * len(prompts), np.random.default_rng(seed))

    def draw(batch_size: int, generator: torch.Generator):
        items = torch.randint(len(index), (batch_size,), generator=generator)
        return latents[items], [prompts[i] for i in index[items].tolist()]

    return draw


def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a binomial rate measured on `n` samples."""
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def run_shapes_alignment(
    output_dir: str | Path,
    *,
    reward: str = "dina",
    pixel_model: str | Path | None = None,
    eval_samples: int = 128,
    validation_samples: int = 64,
    skip_start_eval: bool = False,
    threads: int | None = None,
    refresh_every: int = 0,
    refresh_scored: bool = False,
    refresh_train_steps: int = 20,
    refresh_learning_rate: float = 1e-4,
    refresh_at_scoring_level: bool = False,
    refresh_adversarial_steps: int = 0,
    balanced_prompts: bool = False,
    **overrides,
) -> list[dict]:
    """Align the shipped generator on the train-split prompts; `overrides` are `AlignmentConfig` fields (method,
    steps, learning_rate, ...); `threads` sets torch's intra-op threads (1 is faster on a busy machine).

    `refresh_every` > 0 refreshes the DiNa reward on checker-labelled samples of the current policy (train-split
    prompts) every that many steps (`RewardRefresh`: `refresh_train_steps` updates at `refresh_learning_rate`): the
    method's own scored samples with `refresh_scored` (GRPO's groups), else 16 prompts x 4 fresh samples;
    `refresh_at_scoring_level`: the refresh trains at the noise level(s) the reward scores at, not uniform ones;
    `refresh_adversarial_steps`: each labelled sample is also paired with itself pushed that many steps up the
    reward's gradient (`RewardRefresh(adversarial_steps=...)`: a tie where the checker sees no difference).
    `balanced_prompts`: batches draw count and relation prompts equally often, as the held-out evaluation does (the
    train split holds 7x more relation prompts). With `early_stopping_metric="validation_compliance"` the evaluations
    add the checker's compliance on validation-split prompts and the LoRA kept is the best by it. Logs (`log.jsonl`,
    `curves.png`) and the LoRA in `output_dir`."""
    torch.set_flush_denormal(True)
    if threads:
        torch.set_num_threads(threads)
    pipe = load_generator()
    values = dict(
        prompts=training_prompts(balanced_prompts),
        steps=150,
        batch_size=8,
        learning_rate=3e-4,
        eval_every=50,
        checkpoint_every=0,
        **SHAPES_SAMPLER,
    )
    values.update(overrides, output_dir=str(output_dir))
    config = AlignmentConfig(**values)
    reward_fn = make_reward(
        pipe, reward, pixel_model=pixel_model, noise_level=config.reward_noise_level, seed=config.seed
    )
    differentiable = reward_fn if reward != "checker" else None
    pretrain_data = real_data(config.load_prompts(), seed=config.seed) if config.pretrain_weight > 0 else None
    refresh = None
    if refresh_every:
        if reward != "dina":
            raise ValueError("only the DiNa reward is refreshed (`refresh_every` needs reward='dina').")
        sampler = {**SHAPES_SAMPLER, "num_inference_steps": config.num_inference_steps}
        refresh = RewardRefresh(
            reward_fn.model,
            checker_reward,
            config.load_prompts(),
            every=refresh_every,
            train_steps=refresh_train_steps,
            learning_rate=refresh_learning_rate,
            sample_kwargs=sampler,
            seed=config.seed,
            scored=reward_fn if refresh_scored else None,
            noise_levels=reward_fn.noise_levels if refresh_at_scoring_level else None,
            adversarial_steps=refresh_adversarial_steps,
        )
    return align(
        pipe,
        reward_fn,
        config,
        eval_fn=evaluation_fn(
            eval_samples,
            differentiable,
            validation_samples,
            skip_start=skip_start_eval,
            validation_compliance=config.early_stopping_metric == "validation_compliance",
        ),
        pretrain_data=pretrain_data,
        step_callback=refresh,
    )


def parse_overrides(pairs: list[str]) -> dict:
    """`["key=value", ...]` -> `AlignmentConfig` fields, values read as JSON where they parse (else strings)."""
    known = {f.name for f in dataclasses.fields(AlignmentConfig)}
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--set expects FIELD=VALUE with an AlignmentConfig field, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", choices=("dina", "pixel", "checker"), default="dina")
    parser.add_argument("--pixel-model", help="folder of the pixel reward written by the build's rewards stage")
    parser.add_argument("--output", required=True)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--skip-start-eval", action="store_true", help="no evaluation of the unchanged start")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument(
        "--refresh-every", type=int, default=0, help="refresh DiNa-LRM on checker-labelled policy samples every N steps"
    )
    parser.add_argument(
        "--refresh-scored", action="store_true", help="refresh on the samples the method scored (GRPO's groups)"
    )
    parser.add_argument("--refresh-train-steps", type=int, default=20, help="reward updates per refresh")
    parser.add_argument("--refresh-learning-rate", type=float, default=1e-4, help="the reward's rate in a refresh")
    parser.add_argument(
        "--refresh-at-scoring-level", action="store_true", help="refresh at the reward's scoring noise level(s)"
    )
    parser.add_argument(
        "--refresh-adversarial-steps",
        type=int,
        default=0,
        help="pair each labelled sample with itself pushed N steps up the reward's gradient (a tie if unseen)",
    )
    parser.add_argument("--balanced-prompts", action="store_true", help="draw count and relation prompts equally often")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="AlignmentConfig fields (JSON)")
    args = parser.parse_args(argv)
    run_shapes_alignment(
        args.output,
        reward=args.reward,
        pixel_model=args.pixel_model,
        eval_samples=args.eval_samples,
        skip_start_eval=args.skip_start_eval,
        threads=args.threads,
        refresh_every=args.refresh_every,
        refresh_scored=args.refresh_scored,
        refresh_train_steps=args.refresh_train_steps,
        refresh_learning_rate=args.refresh_learning_rate,
        refresh_at_scoring_level=args.refresh_at_scoring_level,
        refresh_adversarial_steps=args.refresh_adversarial_steps,
        balanced_prompts=args.balanced_prompts,
        **parse_overrides(args.set),
    )


if __name__ == "__main__":
    main()
