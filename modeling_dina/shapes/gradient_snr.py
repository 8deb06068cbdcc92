"""How much signal one alignment step's gradient carries, at the shipped generator (issue 12's diagnosis).

For a method and a reward, `batches` independent batches (fresh prompts, fresh noise) each give one gradient of the
generator LoRA, taken where the optimiser would step. If a batch's gradient is `s + n_k` (a common signal plus
independent noise), the mean cosine between two of them estimates `|s|^2 / (|s|^2 + E|n|^2)`: near 1 when one batch
points the way, near 0 when its direction is noise. A reward of uniform random numbers (no information) calibrates
zero; the spread of the pairwise cosines says how far from it a figure is. Comparable between rewards of one
method only.

    python -m modeling_dina.shapes.gradient_snr --batches 8 --output runs/alignment/gradient_snr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from ..alignment.common import RewardMeter
from ..alignment.config import AlignmentConfig
from ..alignment.loop import STEP_FUNCTIONS, prepare_context
from .align import SHAPES_SAMPLER, make_reward
from .align_report import GRPO
from .data import split_prompts
from .generator import load_generator

# (name, reward, AlignmentConfig overrides): GRPO as alignment.md runs it, one gradient per batch each. Only rewards
# are compared, for one method: a supervised loss (RAFT, DPO) has noise of its own (noise levels, noise draws) that
# this cosine would count against it.
VARIANTS = [
    ("grpo-random", "random", GRPO),
    ("grpo-checker", "checker", GRPO),
    ("grpo-checker-all-sde", "checker", {**GRPO, "sde_steps": None, "share_initial_noise": False}),
    ("grpo-dina", "dina", GRPO),
    ("grpo-checker-grid4", "checker", {**GRPO, "sde_noise_grid": 4}),
    ("grpo-dina-grid4", "dina", {**GRPO, "sde_noise_grid": 4}),
]


def _random_reward(seed: int):
    generator = torch.Generator().manual_seed(seed)

    def reward(latents, prompt_embeds, pooled_prompt_embeds):
        return torch.rand(len(latents), generator=generator).to(latents.device)

    return reward


def step_config(method_overrides: dict, seed: int = 0) -> AlignmentConfig:
    """One step of 8 train-split prompts x 8 samples, 10 sampling steps, one optimisation epoch, unless
    `method_overrides` say otherwise."""
    values = dict(
        prompts=split_prompts()["train"],
        batch_size=8,
        group_size=8,
        inner_epochs=1,
        output_dir="unused",
        seed=seed,
        **{**SHAPES_SAMPLER, "num_inference_steps": 10},
    )
    return AlignmentConfig(**{**values, **method_overrides})


def batch_gradients(method_overrides: dict, reward: str, batches: int, seed: int = 0) -> torch.Tensor:
    """`(batches, P)`: the generator LoRA's gradient of one step (`step_config`) on each of `batches` independent
    batches, from the fresh shipped generator; nothing is updated."""
    pipe = load_generator()
    config = step_config(method_overrides, seed)
    reward_fn = _random_reward(seed) if reward == "random" else make_reward(pipe, reward, seed=seed)
    ctx = prepare_context(pipe, reward_fn, config)
    gradients = []

    def capture() -> float:  # stands in for the optimiser step: keep the gradient, change nothing
        gradients.append(torch.cat([p.grad.flatten().float() for p in ctx.params if p.grad is not None]))
        ctx.optimizer.zero_grad(set_to_none=True)
        return 0.0

    ctx.optimizer_step = capture
    prompts = config.load_prompts()
    for _ in range(batches):
        batch = [prompts[i] for i in torch.randint(len(prompts), (config.batch_size,), generator=ctx.generator)]
        STEP_FUNCTIONS[config.method](ctx, batch, RewardMeter(pipe.transformer.device))
    return torch.stack(gradients)


def pairwise_cosines(gradients: torch.Tensor) -> list[float]:
    """Cosine similarity of every pair of rows."""
    unit = gradients / gradients.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return [float(unit[i] @ unit[j]) for i, j in itertools.combinations(range(len(unit)), 2)]


def summarise(cosines: list[float]) -> dict:
    """Mean pairwise cosine, its spread, and the samples per update it implies for a cosine of 0.5 (one batch
    of 64 has signal fraction `c`; averaging `m` batches gives `m c / (1 + (m - 1) c)`)."""
    mean = sum(cosines) / len(cosines)
    spread = math.sqrt(sum((c - mean) ** 2 for c in cosines) / max(len(cosines) - 1, 1))
    needed = 64 * (1 - mean) / mean if mean > 0 else math.inf
    return {"mean_cosine": mean, "std": spread, "min": min(cosines), "max": max(cosines), "samples_for_0.5": needed}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    parser.add_argument("--output", help="JSON file for the figures")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    results = {}
    for name, reward, overrides in VARIANTS:
        if args.only and name not in args.only:
            continue
        results[name] = summarise(pairwise_cosines(batch_gradients(overrides, reward, args.batches)))
        print(name, json.dumps({k: round(v, 4) for k, v in results[name].items()}), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps({"batches": args.batches, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
