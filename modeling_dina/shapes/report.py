"""The paper's claims in miniature, measured in the Shapes world: held-out accuracy of each reward variant per noise
level and with the ensemble, best-of-N compliance of the generator under each reward, and each reward's scoring
cost. Written as `report.md` + plots by the build's `report` stage."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from datasets import concatenate_datasets
from torch.utils.flop_counter import FlopCounterMode

from ..alignment.reward_fns import decode_latents
from ..noise import NOISE_MODES
from ..pipeline_dina import DiNaRewardPipeline
from ..training import cache_preference_dataset
from ..training.caching import encode_prompts
from .checker import check_many
from .data import build_preference_dataset, make_generated_pairs, split_prompts
from .generator import MAX_SEQUENCE_LENGTH, load_generator, sample_images
from .grammar import alternate_kinds
from .render import IMAGE_SIZE
from .reward import (
    ENSEMBLE_LEVELS,
    EVAL_LEVELS,
    VARIANTS,
    dina_accuracy,
    images_to_pixels,
    pixel_accuracy,
    save_pixel_reward,
    train_dina_reward,
    train_pixel_reward,
)

__all__ = [
    "best_of_n",
    "build_rewards",
    "generate_candidates",
    "generated_pairs",
    "held_out_prompts",
    "scoring_cost",
    "write_report",
]

logger = logging.getLogger(__name__)

LatentScorer = Callable[[list[str], torch.Tensor], torch.Tensor]


def generate_candidates(
    pipe,
    prompts: Sequence[str],
    n: int,
    *,
    seed: int = 0,
    guidance_scale: float = 3.0,
    steps: int = 20,
    batch: int = 64,
) -> tuple[list[str], torch.Tensor]:
    """`n` candidates per prompt as clean latents (what the generator hands a latent reward: no decode), prompt-major;
    candidate `j` of prompt `i` is seeded `seed + i * n + j`."""
    repeated = [p for p in prompts for _ in range(n)]
    latents = sample_images(
        pipe,
        repeated,
        seed=seed,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch,
        output_type="latent",
        progress=True,
    )
    return repeated, latents


@torch.no_grad()
def decode(pipe, latents: torch.Tensor, batch: int = 128) -> list:
    """Clean latents -> PIL images with the generator's VAE, in batches."""
    return [
        image
        for start in range(0, len(latents), batch)
        for image in decode_latents(pipe, latents[start : start + batch])
    ]


def generated_pairs(pipe, prompts: Sequence[str], candidates: int, *, num_pairs: int | None = None, seed: int = 0):
    """On-policy preference pairs: `candidates` samples of the generator per prompt, decoded and judged by the checker,
    paired within each prompt by fewer violated attributes (see `data.make_generated_pairs`)."""
    repeated, latents = generate_candidates(pipe, prompts, candidates, seed=seed)
    images = decode(pipe, latents)
    return make_generated_pairs(repeated, images, check_many(repeated, images), num_pairs=num_pairs, seed=seed)


def held_out_prompts(count: int) -> list[str]:
    """`count` test-split prompts (never seen by the generator or the rewards), alternating count/relation kinds."""
    return alternate_kinds(split_prompts()["test"], count)


def dina_scorer(reward_pipe: DiNaRewardPipeline, batch: int = 256, **levels) -> LatentScorer:
    """Scores clean latents with a DiNa pipeline in latent space (default: the config's level for latents; pass
    `noise_level=` or `noise_levels=` to change it). Prompt embeddings are computed once per prompt, as a generator
    hands them over in an alignment loop."""
    embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    length = reward_pipe.reward_model.config.max_sequence_length

    def score(prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        missing = sorted(set(prompts) - embeddings.keys())
        if missing:
            encoded = encode_prompts(reward_pipe, missing, max_sequence_length=length, batch_size=batch)
            embeddings.update(zip(missing, zip(encoded.embeds, encoded.pooled)))
        embeds = torch.stack([embeddings[p][0] for p in prompts])
        pooled = torch.stack([embeddings[p][1] for p in prompts])
        return reward_pipe(
            prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents, batch_size=batch, **levels
        ).rewards

    return score


def pixel_scorer(model, gen_pipe, pooled_by_prompt: dict, batch: int = 256) -> LatentScorer:
    """Scores latents with a pixel-space reward: VAE decode first, then the pixel model."""

    @torch.no_grad()
    def score(prompts: list[str], latents: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(latents), batch):
            pixels = images_to_pixels(decode(gen_pipe, latents[start : start + batch]))
            pooled = torch.stack([pooled_by_prompt[p] for p in prompts[start : start + batch]])
            out.append(model(pixels, pooled))
        return torch.cat(out)

    return score


def best_of_n(prompts: Sequence[str], n: int, verdicts: Sequence, scores: dict[str, torch.Tensor]) -> dict:
    """Checker compliance of the candidate each reward picks among `n` per prompt, against a random pick (the first
    candidate: all are i.i.d.) and the checker's own best (the oracle ceiling)."""
    ok = np.array([v.overall for v in verdicts], dtype=float).reshape(len(prompts), n)
    result = {"random": float(ok[:, 0].mean()), "oracle": float(ok.max(axis=1).mean()), "prompts": len(prompts), "n": n}
    for name, s in scores.items():
        pick = s.view(len(prompts), n).argmax(dim=1).numpy()
        result[name] = float(ok[np.arange(len(prompts)), pick].mean())
    return result


def scoring_cost(score: LatentScorer, prompts: list[str], latents: torch.Tensor, repeats: int = 3) -> dict:
    """FLOPs per image (counted by torch) and seconds per image of a latent scorer."""
    with FlopCounterMode(display=False) as counter:
        score(prompts, latents)
    start = time.perf_counter()
    for _ in range(repeats):
        score(prompts, latents)
    seconds = (time.perf_counter() - start) / repeats
    return {
        "gflop_per_image": counter.get_total_flops() / len(latents) / 1e9,
        "ms_per_image": 1e3 * seconds / len(latents),
    }


def _plot_accuracy(accuracy: dict[str, dict], levels: Sequence[float], path: Path) -> None:
    """One panel per held-out pair set: accuracy of each DiNa variant against the scoring noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(accuracy), figsize=(6 * len(accuracy), 4), sharey=True, squeeze=False)
    for ax, (pair_set, rows) in zip(axes[0], accuracy.items()):
        for name, row in rows.items():
            values = [row.get(f"u={u}") for u in levels]
            if all(v is not None for v in values):
                (line,) = ax.plot(levels, [100 * v for v in values], marker="o", label=name)
                ax.axhline(100 * row["ensemble"], color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xlabel("noise level u at scoring")
        ax.set_title(f"{pair_set} test pairs (dashed: ensemble)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out pairwise accuracy (%)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_best_of_n(best: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [k for k in best if k not in ("prompts", "n")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(names, [100 * best[k] for k in names], color=["grey" if k in ("random", "oracle") else "C0" for k in names])
    ax.set_ylabel("prompt compliance (%)")
    ax.set_title(f"best-of-{best['n']} over {best['prompts']} held-out prompts (checker)")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _accuracy_tables(accuracy: dict[str, dict], columns: list[str], test_pairs: dict[str, int]) -> list[str]:
    """One markdown table per held-out pair set: a row per reward, a column per noise level (and ensemble, pixels)."""
    lines = []
    for pair_set, rows in accuracy.items():
        lines += [
            "",
            f"### {pair_set} test pairs ({test_pairs[pair_set]})",
            "",
            f"| reward | {' | '.join(columns)} |",
            "|---|" + "---:|" * len(columns),
        ]
        for name, row in rows.items():
            cells = " | ".join(f"{100 * row[c]:.1f}" if c in row else "–" for c in columns)
            lines.append(f"| {name} | {cells} |")
    return lines


def write_report(output_dir: str | Path, results: dict) -> Path:
    """`report.md`, `accuracy_vs_noise.png`, `best_of_n.png` and `report.json` from the build's measurements."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    levels = results["eval_levels"]
    _plot_accuracy(results["accuracy"], levels, out / "accuracy_vs_noise.png")
    _plot_best_of_n(results["best_of_n"], out / "best_of_n.png")
    (out / "report.json").write_text(json.dumps(results, indent=2))

    minutes = f"{results['build_minutes']:.1f} min"
    if "generator_minutes" in results:
        total = results["generator_minutes"] + results["build_minutes"]
        minutes = f"{total:.1f} min (generator stage {results['generator_minutes']:.1f}, rewards stage {minutes})"
    lines = ["# Shapes world report", "", f"Built by `{results['command']}` in {minutes}.", ""]
    gen = results.get("generator")
    if gen:
        lines += [
            "## Generator compliance (checker, held-out prompts)",
            "",
            "| pick | overall | colour | shape | count | position |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for pick, rates in gen.items():
            cells = " | ".join(f"{100 * rates[k]:.1f}" for k in ("overall", "colour", "shape", "count", "position"))
            lines.append(f"| {pick} | {cells} |")
        lines.append("")
    columns = [*(f"u={u}" for u in levels), "ensemble", "pixels"]
    train = results["train_pairs"]
    lines += [
        "## Held-out pairwise accuracy (%)",
        "",
        f"Every reward is trained for {results['reward_steps']} steps on the same {sum(train.values())} pairs: "
        f"{train['rendered']} rendered pairs (a satisfying render against a violating or degraded one) and "
        f"{train['generated']} on-policy pairs ({results['generated_candidates']} generator samples per train-split "
        "prompt, the one with fewer attributes violated by the checker preferred). Test pairs are over prompts never "
        "seen in training. DiNa variants are scored on the VAE latents at noise level u; ensemble = u "
        f"{list(results['ensemble_levels'])}, tokens concatenated (SPEC §3); the pixel reward reads the images.",
    ]
    lines += _accuracy_tables(results["accuracy"], columns, results["test_pairs"])
    if "accuracy_independent_noise" in results:
        lines += [
            "",
            "## Held-out pairwise accuracy with independent noise (%)",
            "",
            "The tables above score a pair's two latents with one noise draw (common random numbers, as in training); "
            "here each latent gets its own draw, as the paper's evaluation does, so the draws' difference enters the "
            "score difference too.",
        ]
        lines += _accuracy_tables(results["accuracy_independent_noise"], columns[:-1], results["test_pairs"])
    best = results["best_of_n"]
    lines += [
        "",
        f"## Best-of-{best['n']} compliance (%), {best['prompts']} held-out prompts",
        "",
        "| pick | compliance |",
        "|---|---:|",
        *[f"| {k} | {100 * v:.1f} |" for k, v in best.items() if k not in ("prompts", "n")],
        "",
        "## Scoring cost per image (CPU, this machine)",
        "",
        "| reward | trainable params | GFLOP | ms |",
        "|---|---:|---:|---:|",
        *[
            f"| {k} | {v['trainable_parameters']:,} | {v['gflop_per_image']:.4f} | {v['ms_per_image']:.2f} |"
            for k, v in results["cost"].items()
        ],
        "",
        "![accuracy vs noise level](accuracy_vs_noise.png)",
        "",
        "![best of n](best_of_n.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_rewards(
    output_dir: str | Path,
    *,
    seed: int = 0,
    generator_dir: str | Path | None = None,
    train_pairs: int = 4000,
    test_pairs: int = 1000,
    generated_candidates: int = 16,
    reward_steps: int = 1200,
    eval_prompts: int = 320,
    best_of: int = 4,
) -> dict:
    """The build's `rewards` stage: train DiNa-LRM and the report's variants on the generator's first blocks (and the
    pixel-space reward) on the same pairs; measure held-out accuracy per noise level and with the ensemble, best-of-N
    compliance of the generator under each reward and each reward's scoring cost; write `output_dir/report`. The
    method's model is saved to `output_dir/rewards/dina`.

    The training pairs are `train_pairs` rendered pairs plus every on-policy pair of `generated_candidates` generator
    samples per train-split prompt: a reward that has seen only clean renders does not rank the generator's own
    failures (`generated_candidates=0` trains on the rendered pairs alone, to show it). Held-out accuracy is measured
    on `test_pairs` rendered pairs and as many on-policy pairs of test-split prompts (seeds unused by the best-of-N
    evaluation)."""
    torch.set_flush_denormal(True)
    output_dir = Path(output_dir)
    generator_dir = Path(generator_dir) if generator_dir is not None else output_dir / "generator"
    start = time.perf_counter()
    generator = load_generator(path=generator_dir)
    prompts_by_split = split_prompts()
    rendered = build_preference_dataset({"train": train_pairs, "test": test_pairs}, seed=seed)
    train, on_policy = rendered["train"], 0
    test_sets = {"rendered": rendered["test"]}
    if generated_candidates:
        on_policy_train = generated_pairs(
            generator, prompts_by_split["train"], generated_candidates, seed=seed + 10_000
        )
        test_sets["generated"] = generated_pairs(
            generator, prompts_by_split["test"], generated_candidates, num_pairs=test_pairs, seed=seed + 20_000
        )
        train, on_policy = concatenate_datasets([train, on_policy_train]).shuffle(seed=seed), len(on_policy_train)

    def cache(name: str, pairs):
        return cache_preference_dataset(
            pairs,
            generator,
            output_dir / "cache" / name,
            batch_size=128,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            buckets=[(IMAGE_SIZE, IMAGE_SIZE)],
        )

    train_cache = cache("train", train)
    test_caches = {name: cache(f"test_{name}", pairs) for name, pairs in test_sets.items()}

    accuracy = {mode: {name: {} for name in test_sets} for mode in NOISE_MODES}
    models = {}
    for variant in VARIANTS:
        models[variant] = train_dina_reward(
            generator_dir, train_cache, output_dir / "rewards" / variant, variant=variant, steps=reward_steps, seed=seed
        )
        for mode, (name, test_cache) in itertools.product(NOISE_MODES, test_caches.items()):
            levels = {f"u={u}": [u] for u in EVAL_LEVELS} | {"ensemble": list(ENSEMBLE_LEVELS)}
            row = {k: dina_accuracy(models[variant], test_cache, v, seed=seed, noise=mode) for k, v in levels.items()}
            accuracy[mode][name][variant] = row
            logger.info("%s accuracy on %s pairs, %s noise: %s", variant, name, mode, row)

    prompts = sorted({*train["prompt"], *prompts_by_split["test"]})  # the held-out prompts are test-split prompts
    pooled = encode_prompts(generator, prompts, max_sequence_length=MAX_SEQUENCE_LENGTH, batch_size=256).pooled
    pooled_by_prompt = dict(zip(prompts, pooled))
    pixel = train_pixel_reward(train, pooled_by_prompt, steps=reward_steps, seed=seed)
    save_pixel_reward(pixel, output_dir / "rewards" / "pixel")
    for name, pairs in test_sets.items():
        accuracy["shared"][name]["pixel"] = {"pixels": pixel_accuracy(pixel, pairs, pooled_by_prompt)}

    # Best-of-N on held-out prompts: generate latents once, let every reward pick.
    eval_set = held_out_prompts(eval_prompts)
    repeated, latents = generate_candidates(generator, eval_set, best_of, seed=seed)
    verdicts = check_many(repeated, decode(generator, latents))
    scorers = {}
    for name, model in models.items():
        reward_pipe = DiNaRewardPipeline.from_pipe(generator, reward_model=model)
        reward_pipe.set_progress_bar_config(disable=True)
        scorers[name] = dina_scorer(reward_pipe)
        if name == "dina":
            scorers["dina_ensemble"] = dina_scorer(reward_pipe, noise_levels=list(ENSEMBLE_LEVELS))
    scorers["pixel"] = pixel_scorer(pixel, generator, pooled_by_prompt)
    scores = {name: score(repeated, latents) for name, score in scorers.items()}
    best = best_of_n(eval_set, best_of, verdicts, scores)

    probe = slice(0, 64)
    cost = {name: {"trainable_parameters": _trainable(models["dina"])} for name in ("dina", "dina_ensemble")}
    cost["pixel"] = {"trainable_parameters": _trainable(pixel)}
    for model in (*models.values(), pixel):
        model.requires_grad_(False)  # torch's FLOP counter cannot trace trainable parameters under no_grad
    for name in cost:
        cost[name].update(scoring_cost(scorers[name], repeated[probe], latents[probe]))

    results = {
        "command": "python -m modeling_dina.shapes.build --stage all --output DIR",
        "build_minutes": (time.perf_counter() - start) / 60,
        "eval_levels": list(EVAL_LEVELS),
        "ensemble_levels": list(ENSEMBLE_LEVELS),
        "test_pairs": {name: len(pairs) for name, pairs in test_sets.items()},
        "train_pairs": {"rendered": len(rendered["train"]), "generated": on_policy},
        "generated_candidates": generated_candidates,
        "reward_steps": reward_steps,
        "accuracy": accuracy["shared"],
        "accuracy_independent_noise": accuracy["independent"],
        "best_of_n": best,
        "cost": cost,
    }
    metrics_path = generator_dir.parent / "generator_metrics.json"
    if metrics_path.is_file():
        generator_metrics = json.loads(metrics_path.read_text())
        results["generator"] = generator_metrics.get("compliance_test_prompts")
        results["generator_minutes"] = generator_metrics["wall_seconds"] / 60
    write_report(output_dir / "report", results)
    return results
