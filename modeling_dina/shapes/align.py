"""Alignment in the Shapes world: ReFL or GRPO fine-tuning of the shipped generator's LoRA against DiNa-LRM (latent
space, one shared copy of the base blocks) or against the pixel-space reward of the report (VAE decode first), with
the checker's prompt compliance on held-out prompts — which neither reward sees — measured before, during and after.

    python -m modeling_dina.shapes.align --reward dina --output runs/align-dina
    python -m modeling_dina.shapes.align --reward dina --method grpo --output runs/align-dina-grpo
    python -m modeling_dina.shapes.align --reward pixel --pixel-model BUILD/rewards/pixel --output runs/align-pixel
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..alignment import AlignmentConfig, DiNaLatentReward, align
from ..modeling_dina import DiNaRewardModel
from .data import split_prompts
from .generator import MAX_SEQUENCE_LENGTH, evaluate_generator, load_generator
from .report import held_out_prompts
from .reward import REWARD_DIR, PixelReward, load_pixel_reward

__all__ = ["PixelLatentReward", "run_shapes_alignment"]


class PixelLatentReward:
    """The pixel-space reward as a differentiable latent reward: VAE decode (with gradients), then the pixel model
    on the decoded pixels and the generator's own pooled prompt embedding."""

    def __init__(self, vae, model: PixelReward):
        self.vae, self.model = vae, model

    def __call__(self, latents, prompt_embeds, pooled_prompt_embeds):
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(z).sample.clamp(-1, 1)
        return self.model(pixels.float(), pooled_prompt_embeds.float())


def run_shapes_alignment(
    output_dir: str | Path,
    *,
    reward: str = "dina",
    pixel_model: str | Path | None = None,
    method: str = "refl",
    group_size: int = 4,
    train_timesteps: int | None = None,
    steps: int = 150,
    batch_size: int = 8,
    learning_rate: float = 3e-4,
    kl_weight: float = 0.0,
    eval_every: int = 50,
    eval_samples: int = 128,
    seed: int = 0,
) -> list[dict]:
    """ReFL or GRPO (`method`) on the train-split prompts for `steps` steps; logs (`log.jsonl`, `curves.png`) in
    `output_dir`. `group_size` and `train_timesteps` are GRPO's (see `AlignmentConfig`)."""
    torch.set_flush_denormal(True)
    pipe = load_generator()
    if reward == "dina":
        # Built on the generator's own transformer: one copy of the base blocks, the reward LoRA on only while scoring.
        model = DiNaRewardModel.from_pretrained(REWARD_DIR, base_model=pipe.transformer)
        reward_fn = DiNaLatentReward(model, model.config.noise_level_latents, seed=seed)
    elif reward == "pixel":
        if pixel_model is None:
            raise ValueError("the pixel reward needs `pixel_model`, the folder the build's rewards stage wrote.")
        reward_fn = PixelLatentReward(pipe.vae, load_pixel_reward(pixel_model))
    else:
        raise ValueError(f"reward must be 'dina' or 'pixel', got {reward!r}")
    eval_set = held_out_prompts(eval_samples)

    def compliance(p, step):
        rates = evaluate_generator(p, eval_set, num_samples=eval_samples, best_of=1, seed=10_000)["random"]
        return {"compliance": rates["overall"], "count": rates["count"], "position": rates["position"]}

    config = AlignmentConfig(
        method=method,
        group_size=group_size,
        train_timesteps=train_timesteps,
        prompts=split_prompts()["train"],
        steps=steps,
        learning_rate=learning_rate,
        kl_weight=kl_weight,
        batch_size=batch_size,
        guidance_scale=3.0,
        num_inference_steps=20,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        eval_every=eval_every,
        checkpoint_every=0,
        seed=seed,
        output_dir=str(output_dir),
    )
    return align(pipe, reward_fn, config, eval_fn=compliance)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reward", choices=("dina", "pixel"), default="dina")
    parser.add_argument("--pixel-model", help="folder of the pixel reward written by the build's rewards stage")
    parser.add_argument("--method", choices=("refl", "grpo"), default="refl")
    parser.add_argument("--group-size", type=int, default=4, help="GRPO: samples per prompt")
    parser.add_argument("--train-timesteps", type=int, default=None, help="GRPO: transitions trained per trajectory")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--kl-weight", type=float, default=0.0, help="weight of the LoRA-vs-base prediction penalty")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_shapes_alignment(
        args.output,
        reward=args.reward,
        pixel_model=args.pixel_model,
        method=args.method,
        group_size=args.group_size,
        train_timesteps=args.train_timesteps,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        kl_weight=args.kl_weight,
        eval_every=args.eval_every,
        eval_samples=args.eval_samples,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
