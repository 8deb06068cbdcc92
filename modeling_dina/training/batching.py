"""Batching cached pairs: a collator into model-ready tensors and a sampler that keeps each batch to one latent size."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

INPUT_NAMES = (
    "chosen_latents",
    "rejected_latents",
    "prompt_embeds",
    "pooled_prompt_embeds",
    "prompt_embeds_mask",
    "labels",
)
OPTIONAL_INPUTS = ("pooled_prompt_embeds", "prompt_embeds_mask")  # as the base's family has them (SD3, FLUX: pooled)


class PreferenceCollator:
    """Stack cached examples (`chosen_latents`, `rejected_latents`, `prompt_embeds`, `label` and, where the family
    has them, `pooled_prompt_embeds` and the bool `prompt_embeds_mask`) into fp32 tensors; `label` becomes `labels`.
    All latents of a batch must share one size."""

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty batch")
        sizes = {tuple(e[k].shape) for e in examples for k in ("chosen_latents", "rejected_latents")}
        if len(sizes) > 1:
            raise ValueError(
                f"a batch mixes latent sizes {sorted(sizes)}: batch pairs by bucket (DiNaTrainer does so for datasets "
                "with `bucket_ids`, such as a `CachedPreferenceDataset`)"
            )

        def stack(key: str) -> torch.Tensor:
            dtype = torch.bool if key == "prompt_embeds_mask" else torch.float32
            return torch.stack([torch.as_tensor(e[key], dtype=dtype) for e in examples])

        batch = {key: stack(key) for key in INPUT_NAMES[:-1] if key not in OPTIONAL_INPUTS or key in examples[0]}
        batch["labels"] = torch.tensor([float(e["label"]) for e in examples], dtype=torch.float32)
        return batch


class BucketSampler(torch.utils.data.Sampler[int]):
    """Indices in chunks of `chunk_size` consecutive indices from one bucket, shuffled per epoch.

    Make `chunk_size` the global micro-batch (per-device batch x processes): the loader's per-device batches are then
    single-size, and the order does not depend on how many processes share a batch. A bucket's last chunk is filled
    up with its own indices again, so every pair is seen each epoch.
    """

    def __init__(self, bucket_ids: Sequence[Hashable], chunk_size: int, *, seed: int = 0, shuffle: bool = True):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not len(bucket_ids):
            raise ValueError("no examples to sample")
        self.groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(bucket_ids):
            self.groups.setdefault(bucket, []).append(index)
        self.chunk_size, self.seed, self.shuffle, self.epoch = chunk_size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(g) / self.chunk_size) * self.chunk_size for g in self.groups.values())

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        chunks = []
        for bucket in sorted(self.groups):
            group = torch.tensor(self.groups[bucket])
            if self.shuffle:
                group = group[torch.randperm(len(group), generator=generator)]
            padded = math.ceil(len(group) / self.chunk_size) * self.chunk_size
            group = group[torch.arange(padded) % len(group)]
            chunks.extend(group.view(-1, self.chunk_size))
        order = torch.randperm(len(chunks), generator=generator) if self.shuffle else range(len(chunks))
        for position in order:
            yield from chunks[position].tolist()


def single_size_batches(bucket_ids: Sequence[Hashable], batch_size: int) -> list[list[int]]:
    """Evaluation batches: every index once, batches of one bucket, in dataset order within each bucket."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Hashable, list[int]] = {}
    for index, bucket in enumerate(bucket_ids):
        groups.setdefault(bucket, []).append(index)
    return [g[i : i + batch_size] for _, g in sorted(groups.items()) for i in range(0, len(g), batch_size)]


__all__ = ["BucketSampler", "INPUT_NAMES", "OPTIONAL_INPUTS", "PreferenceCollator", "single_size_batches"]
