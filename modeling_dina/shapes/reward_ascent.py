"""Does the reward's gradient point to better images? Gradient ascent on DiNa-LRM, judged by the checker.

Held-out prompts are sampled with the 10-step ODE (CFG 3) up to step `k`; the latent there is then pushed up the
reward's gradient (normalised steps) *through the rest of the sampler* (the base generator finishes the chain), and
the checker judges the images the pushed latents end in. `k = 10` pushes the finished sample itself, as a ReFL
update at the last step does; a small `k` pushes the state where a layout is decided and lets the generator's own
denoising keep the change on the image manifold. Reward up with compliance flat is a gradient no aligned generator
can use.

    python -m modeling_dina.shapes.reward_ascent --from-steps 10 6 2 --output runs/alignment/reward_ascent.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..alignment import DiNaLatentReward, encode_prompts
from ..alignment.sampling import euler_step, guided_velocity, inference_schedule, initial_latents
from ..modeling_dina import DiNaRewardModel
from .checker import check_many
from .generator import MAX_SEQUENCE_LENGTH, load_generator
from .report import decode, held_out_prompts
from .reward import REWARD_DIR

STEPS, GUIDANCE = 10, 3.0


def run_steps(pipe, latents, cond, schedule, start: int, stop: int) -> torch.Tensor:
    """The sampler's Euler steps `start` to `stop - 1` (step `STEPS - 1` lands on the x0 prediction)."""
    sigmas, timesteps = schedule
    for i in range(start, stop):
        velocity = guided_velocity(pipe.transformer, latents, timesteps[i], cond, GUIDANCE)
        latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1] if i < STEPS - 1 else 0.0)
    return latents


def ascend(
    from_step: int,
    *,
    num_prompts: int = 128,
    iterations: int = 6,
    step_size: float = 0.05,
    noise_level: float = 0.4,
    draws: int = 2,
    seed: int = 7,
) -> list[dict]:
    """Reward (mean of `draws` noise draws) and compliance after each of `iterations` ascent steps of per-element RMS
    `step_size` on the latent at sampling step `from_step`; record 0 is the unpushed samples."""
    pipe = load_generator()
    pipe.transformer.requires_grad_(False)
    model = DiNaRewardModel.from_pretrained(REWARD_DIR, base_model=pipe.transformer).requires_grad_(False)
    reward = DiNaLatentReward(model, noise_level, seed=seed)
    prompts = held_out_prompts(num_prompts)
    cond = encode_prompts(pipe, prompts, guidance_scale=GUIDANCE, max_sequence_length=MAX_SEQUENCE_LENGTH)
    latents = initial_latents(pipe, num_prompts, 64, 64, torch.Generator().manual_seed(seed))
    schedule = inference_schedule(pipe, STEPS, latents.shape)
    with torch.no_grad():
        state = run_steps(pipe, latents, cond, schedule, 0, from_step)
    records = []
    for it in range(iterations + 1):
        state = state.detach().requires_grad_(True)
        final = run_steps(pipe, state, cond, schedule, from_step, STEPS)
        rewards = torch.stack(
            [reward(final, cond.prompt_embeds, cond.pooled_prompt_embeds) for _ in range(draws)]
        ).mean(0)
        verdicts = check_many(prompts, decode(pipe, final.detach()))
        records.append(
            {
                "iteration": it,
                "reward": rewards.mean().item(),
                "compliance": sum(v.overall for v in verdicts) / num_prompts,
            }
        )
        if it == iterations:
            break
        (grad,) = torch.autograd.grad(rewards.sum(), state)
        rms = grad.flatten(1).pow(2).mean(dim=1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
        state = state.detach() + step_size * grad / rms
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-steps", nargs="+", type=int, default=[STEPS, 6, 2])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--step-size", type=float, default=0.05)
    parser.add_argument("--noise-level", type=float, default=0.4)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--output", help="JSON file for the records")
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for k in args.from_steps:
        if not 0 <= k <= STEPS:
            parser.error(f"--from-steps must lie in [0, {STEPS}], got {k}")
        results[k] = ascend(
            k,
            num_prompts=args.prompts,
            iterations=args.iterations,
            step_size=args.step_size,
            noise_level=args.noise_level,
        )
        row = " ".join(f"{100 * r['compliance']:.1f}% ({r['reward']:+.2f})" for r in results[k])
        print(f"from step {k:2d}: compliance (reward) by iteration: {row}", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
