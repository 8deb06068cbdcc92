"""Preference data of the Shapes world as `datasets` objects, with prompt-disjoint splits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from datasets import Dataset, DatasetDict, Features, Image, List, Value

from .grammar import ATTRIBUTES, CheckResult, all_prompts, group_by_kind, parse_prompt
from .render import DEGRADATIONS, degrade, render

__all__ = [
    "PAIR_FEATURES",
    "RANKED_FEATURES",
    "SPLITS",
    "build_preference_dataset",
    "build_ranked_dataset",
    "make_generated_pairs",
    "make_preference_pairs",
    "make_ranked_groups",
    "split_prompts",
]

SPLITS: tuple[str, ...] = ("train", "validation", "test")
PAIR_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Image(),
        "rejected": Image(),
        "label": Value("float32"),  # 1.0: chosen preferred, 0.5: tie
        "kind": Value("string"),  # "violation", "degraded", "tie" or "generated"
        "violations": List(Value("string")),  # attributes the rejected image violates, in ATTRIBUTES order
        "degradation": Value("string"),  # one of render.DEGRADATIONS for "degraded" pairs, else ""
    }
)
RANKED_FEATURES = Features(
    {
        "prompt": Value("string"),
        "images": List(Image()),
        "ranks": List(Value("int32")),  # 0 = best; images with equally many violations share a rank
        "violations": List(List(Value("string"))),
    }
)


def split_prompts(seed: int = 0, fractions: Sequence[float] = (0.7, 0.15, 0.15)) -> dict[str, list[str]]:
    """Disjoint train/validation/test prompt lists, stratified by prompt kind (count / relation)."""
    if len(fractions) != 3 or min(fractions) <= 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions}")
    rng = np.random.default_rng(seed)
    splits: dict[str, list[str]] = {name: [] for name in SPLITS}
    for kind in ("count", "relation"):
        prompts = [all_prompts(kind)[i] for i in rng.permutation(len(all_prompts(kind)))]
        n_train = round(fractions[0] * len(prompts))
        n_val = round(fractions[1] * len(prompts))
        bounds = (0, n_train, n_train + n_val, len(prompts))
        for name, lo, hi in zip(SPLITS, bounds, bounds[1:]):
            splits[name] += sorted(prompts[lo:hi])
    return splits


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _in_order(attributes) -> list[str]:
    """Attribute names in `ATTRIBUTES` order, as `CheckResult.violations` lists them."""
    return [a for a in ATTRIBUTES if a in set(attributes)]


def _draw_prompt(prompts: Sequence[str], rng: np.random.Generator) -> str:
    """A random prompt, count and relation prompts half and half (there are far more relation prompts)."""
    by_kind = group_by_kind(prompts)
    pool = by_kind[rng.integers(len(by_kind))]
    return pool[rng.integers(len(pool))]


def make_preference_pairs(
    prompts: Sequence[str],
    num_pairs: int,
    *,
    seed: int = 0,
    degraded_fraction: float = 0.3,
    tie_fraction: float = 0.0,
    two_violation_fraction: float = 0.3,
) -> Dataset:
    """Preference pairs over `prompts`; the chosen image always satisfies its prompt.

    - "violation" pairs: the rejected image violates one (or, with `two_violation_fraction`, two) random
      attributes of the prompt (colour, shape, count, and position for relation prompts);
    - "degraded" pairs (`degraded_fraction`): the rejected image is another satisfying render, degraded;
    - "tie" pairs (`tie_fraction`): two satisfying renders, label 0.5.
    """
    if not prompts:
        raise ValueError("prompts must not be empty")
    fractions = (degraded_fraction, tie_fraction, two_violation_fraction)
    if num_pairs < 0 or min(fractions) < 0 or max(fractions) > 1 or degraded_fraction + tie_fraction > 1:
        raise ValueError(f"need num_pairs >= 0 and fractions in [0, 1] with degraded + tie <= 1, got {fractions}")
    rng = _rng(seed, 0)
    rows: dict[str, list] = {name: [] for name in PAIR_FEATURES}
    for _ in range(num_pairs):
        prompt = _draw_prompt(prompts, rng)
        attributes = parse_prompt(prompt).attributes
        chosen = render(prompt, rng)
        u = rng.random()
        violations: list[str] = []
        degradation = ""
        if u < tie_fraction:
            kind, label, rejected = "tie", 0.5, render(prompt, rng)
        elif u < tie_fraction + degraded_fraction:
            degradation = str(rng.choice(DEGRADATIONS))
            kind, label, rejected = "degraded", 1.0, degrade(render(prompt, rng), degradation, rng)
        else:
            k = 2 if rng.random() < two_violation_fraction else 1
            violations = _in_order(rng.choice(attributes, size=k, replace=False))
            kind, label, rejected = "violation", 1.0, render(prompt, rng, violations)
        for name, value in zip(PAIR_FEATURES, (prompt, chosen, rejected, label, kind, violations, degradation)):
            rows[name].append(value)
    return Dataset.from_dict(rows, features=PAIR_FEATURES)


def make_generated_pairs(
    prompts: Sequence[str],
    images: Sequence,
    verdicts: Sequence[CheckResult],
    *,
    num_pairs: int | None = None,
    seed: int = 0,
) -> Dataset:
    """On-policy pairs from a generator's own samples, labelled by the checker: among the samples of one prompt, a
    sample with fewer violated attributes is preferred to one with more (kind "generated"; `violations` lists the
    rejected sample's). `prompts`, `images` and `verdicts` are aligned, one entry per sample; `num_pairs` draws at most
    that many of all such pairs at random (default: all of them)."""
    if not len(prompts) == len(images) == len(verdicts):
        raise ValueError(
            f"need one image and one verdict per prompt, got {len(prompts)} prompts, {len(images)} images and "
            f"{len(verdicts)} verdicts"
        )
    by_prompt: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_prompt.setdefault(prompt, []).append(i)
    candidates = [
        (i, j)
        for members in by_prompt.values()
        for i in members
        for j in members
        if len(verdicts[i].violations) < len(verdicts[j].violations)
    ]
    if num_pairs is not None and num_pairs < len(candidates):
        candidates = [candidates[k] for k in sorted(_rng(seed, 2).choice(len(candidates), num_pairs, replace=False))]
    rows = {
        "prompt": [prompts[i] for i, _ in candidates],
        "chosen": [images[i] for i, _ in candidates],
        "rejected": [images[j] for _, j in candidates],
        "label": [1.0] * len(candidates),
        "kind": ["generated"] * len(candidates),
        "violations": [verdicts[j].violations for _, j in candidates],
        "degradation": [""] * len(candidates),
    }
    return Dataset.from_dict(rows, features=PAIR_FEATURES)


def make_ranked_groups(prompts: Sequence[str], num_groups: int, *, group_size: int = 4, seed: int = 0) -> Dataset:
    """Ranked groups: per prompt, one satisfying image and `group_size - 1` images with 0..all violated
    attributes, shuffled; rank = dense rank of the number of violations (0 = best)."""
    if not prompts:
        raise ValueError("prompts must not be empty")
    if group_size < 2:
        raise ValueError(f"group_size must be at least 2, got {group_size}")
    rng = _rng(seed, 1)
    rows: dict[str, list] = {name: [] for name in RANKED_FEATURES}
    for _ in range(num_groups):
        prompt = _draw_prompt(prompts, rng)
        attributes = parse_prompt(prompt).attributes
        counts = [0, *rng.integers(0, len(attributes) + 1, size=group_size - 1)]
        sets = [_in_order(rng.choice(attributes, size=k, replace=False)) for k in counts]
        order = rng.permutation(group_size)
        levels = sorted(set(counts))
        rows["prompt"].append(prompt)
        rows["images"].append([render(prompt, rng, sets[i]) for i in order])
        rows["ranks"].append([levels.index(counts[i]) for i in order])
        rows["violations"].append([sets[i] for i in order])
    return Dataset.from_dict(rows, features=RANKED_FEATURES)


def _per_split(sizes: int | Mapping[str, int], seed: int, split_seed: int, make, **kwargs) -> DatasetDict:
    sizes = {name: sizes for name in SPLITS} if isinstance(sizes, int) else dict(sizes)
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected a subset of {SPLITS}")
    prompts = split_prompts(split_seed)
    return DatasetDict(
        {name: make(prompts[name], n, seed=seed + 7919 * SPLITS.index(name), **kwargs) for name, n in sizes.items()}
    )


def build_preference_dataset(
    sizes: int | Mapping[str, int] | None = None, *, seed: int = 0, split_seed: int = 0, **kwargs
) -> DatasetDict:
    """Preference pairs (see `make_preference_pairs`) for each split, over that split's prompts.

    `sizes`: pairs per split (default train 4000, validation 500, test 1000).
    """
    sizes = sizes if sizes is not None else {"train": 4000, "validation": 500, "test": 1000}
    return _per_split(sizes, seed, split_seed, make_preference_pairs, **kwargs)


def build_ranked_dataset(
    sizes: int | Mapping[str, int] | None = None, *, seed: int = 0, split_seed: int = 0, **kwargs
) -> DatasetDict:
    """Ranked groups (see `make_ranked_groups`) for each split (default validation 200, test 500)."""
    sizes = sizes if sizes is not None else {"validation": 200, "test": 500}
    return _per_split(sizes, seed, split_seed, make_ranked_groups, **kwargs)
