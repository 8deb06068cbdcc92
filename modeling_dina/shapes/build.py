"""Build the Shapes world's artefacts stage by stage.

    python -m modeling_dina.shapes.build --stage all --output DIR --install   # everything, then into the package
    python -m modeling_dina.shapes.build --stage generator --output DIR        # one stage

Each stage is a function `build_<stage>(output_dir, **options) -> metrics` registered in `STAGES`; it writes its
artefacts under `output_dir` and its metrics to `output_dir/<stage>_metrics.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .data import split_prompts
from .generator import GENERATOR_DIR, build_untrained_pipeline, evaluate_generator, train_transformer, train_vae

__all__ = ["STAGES", "build_generator", "main"]

logger = logging.getLogger(__name__)


def build_generator(
    output_dir: str | Path,
    *,
    seed: int = 0,
    vae_steps: int = 600,
    transformer_steps: int = 5000,
    eval_samples: int = 512,
    best_of: int = 4,
    guidance_scale: float = 3.0,
    **_,
) -> dict:
    """Train the VAE, then the transformer on the train-split prompts; save the pipeline to
    `output_dir/generator` and report checker compliance on the test-split prompts (0 samples skips it)."""
    # Denormal floats make CPU training several times slower here.
    torch.set_flush_denormal(True)
    output_dir = Path(output_dir)
    start = time.perf_counter()
    pipe = build_untrained_pipeline(seed)
    pipe.set_progress_bar_config(disable=True)
    metrics: dict = {"seed": seed, "vae": train_vae(pipe.vae, steps=vae_steps, seed=seed)}
    logger.info("VAE: %s", metrics["vae"])
    splits = split_prompts()
    metrics["transformer"] = train_transformer(pipe, splits["train"], steps=transformer_steps, seed=seed)
    metrics["train_seconds"] = time.perf_counter() - start
    pipe.save_pretrained(output_dir / "generator", safe_serialization=True)
    if eval_samples:
        metrics["compliance_test_prompts"] = evaluate_generator(
            pipe, splits["test"], num_samples=eval_samples, best_of=best_of, seed=seed, guidance_scale=guidance_scale
        )
        metrics["eval"] = {"samples": eval_samples, "best_of": best_of, "guidance_scale": guidance_scale, "steps": 20}
    metrics["wall_seconds"] = time.perf_counter() - start
    (output_dir / "generator_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def build_rewards_stage(
    output_dir: str | Path, *, seed: int = 0, reward_steps: int = 1200, generated_candidates: int = 16, **_
) -> dict:
    """DiNa-LRM, its ablations and the pixel reward on the generator of `output_dir/generator`, and the report."""
    from .report import build_rewards  # imports the trainer and the pipeline, which the generator stage does not need

    return build_rewards(output_dir, seed=seed, reward_steps=reward_steps, generated_candidates=generated_candidates)


def build_all(output_dir: str | Path, **options) -> dict:
    return {"generator": build_generator(output_dir, **options), "rewards": build_rewards_stage(output_dir, **options)}


def install(output_dir: str | Path) -> None:
    """Copy the built generator and DiNa-LRM into the package (what `dina demo` and the tests load)."""
    from .reward import install_reward

    output_dir = Path(output_dir)
    shutil.rmtree(GENERATOR_DIR, ignore_errors=True)
    shutil.copytree(output_dir / "generator", GENERATOR_DIR)
    shutil.copyfile(output_dir / "generator_metrics.json", GENERATOR_DIR.parent / "generator_metrics.json")
    install_reward(output_dir / "rewards" / "dina")


STAGES: dict[str, Callable[..., dict]] = {
    "generator": build_generator,
    "rewards": build_rewards_stage,
    "all": build_all,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", required=True, choices=sorted(STAGES))
    parser.add_argument("--output", required=True, type=Path, help="folder for the stage's artefacts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--transformer-steps", type=int, default=5000)
    parser.add_argument("--eval-samples", type=int, default=512, help="0 skips the compliance evaluation")
    parser.add_argument("--reward-steps", type=int, default=1200, help="training steps of each reward")
    parser.add_argument(
        "--generated-candidates", type=int, default=16, help="generator samples per train prompt for on-policy pairs"
    )
    parser.add_argument("--install", action="store_true", help="copy the results into the package's assets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    metrics = STAGES[args.stage](
        args.output,
        seed=args.seed,
        vae_steps=args.vae_steps,
        transformer_steps=args.transformer_steps,
        eval_samples=args.eval_samples,
        reward_steps=args.reward_steps,
        generated_candidates=args.generated_candidates,
    )
    print(json.dumps(metrics, indent=2))
    if args.install:
        install(args.output)


if __name__ == "__main__":
    main()
