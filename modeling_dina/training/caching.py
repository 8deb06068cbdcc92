"""Encode preference pairs once (VAE latents, prompt embeddings) so that no training step runs the VAE or the text
encoders.

A cache folder holds:

- `cache_info.json`: the settings it was made with (a rerun with other settings is refused) and, once complete,
  the totals;
- `shards/NNNNN/pairs` and `shards/NNNNN/prompts`: `datasets` folders (`save_to_disk`). Pair rows hold the source
  `row`, `prompt`, `prompt_index` (a row of the concatenated prompt shards), `label`, the latent size and the
  chosen/rejected latents (flat); prompt rows hold each distinct prompt once with its `prompt_embeds` (L, D) and,
  as the base's family has them, `pooled_prompt_embeds` (SD3, FLUX) and `prompt_embeds_mask` (Qwen-Image, Z-Image);
- `skipped_rows.json`: the rows left out because an image could not be read (a missing file included) or the prompt
  is not a string (also logged as warnings).

Each shard is written to a temporary folder and renamed when complete, so an interrupted run resumes at the first
missing shard. Images are resized and centre-cropped to the nearest aspect-ratio bucket (sides multiples of the
VAE factor times the patch size, 16 for every family) and chosen and rejected of a pair share a bucket, so pairs of one
bucket batch together.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple

import torch
from datasets import Array2D, Dataset, Features, Image, List, Value, concatenate_datasets, load_from_disk
from tqdm.auto import tqdm

from ..data import validate_pairs
from ..image_processing_dina import DiNaImageProcessor
from .buckets import BUCKET_POLICIES, RELEASED_BUCKETS, RELEASED_MIN_AREA, make_buckets, nearest_bucket, pair_bucket
from .encoders import base_geometry, encode_images, encode_prompts, image_to_pixels, load_encoders

logger = logging.getLogger(__name__)

CACHE_INFO_NAME = "cache_info.json"
SKIPPED_ROWS_NAME = "skipped_rows.json"
_SHARDS = "shards"
OPTIONAL_PROMPT_COLUMNS = ("pooled_prompt_embeds", "prompt_embeds_mask")
_SETTINGS_ADDED_LATER = {"bucket_policy": "dense", "sample_posterior": False}  # what older caches were made with


# ----------------------------------------------------------------------------------------------------------
# The cached dataset
# ----------------------------------------------------------------------------------------------------------
class CachedPreferenceDataset(torch.utils.data.Dataset):
    """Cached pairs as a map-style dataset: item `i` holds `chosen_latents`/`rejected_latents` `(C, h, w)`,
    `prompt_embeds` `(L, D)`, `pooled_prompt_embeds` `(P,)` and `label` as tensors (memory-mapped, nothing encoded).

    `bucket_ids` gives each pair's latent size; `DiNaTrainer` batches pairs of one size together.
    """

    def __init__(self, pairs: Dataset, prompts: Dataset, latent_channels: int):
        self.pairs = pairs.with_format("numpy")
        self.prompts = prompts.with_format("numpy")
        self.latent_channels = latent_channels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.pairs[int(index)]
        prompt = self.prompts[int(row["prompt_index"])]
        shape = (self.latent_channels, int(row["latent_height"]), int(row["latent_width"]))
        item = {
            "chosen_latents": torch.from_numpy(row["chosen_latents"]).reshape(shape),
            "rejected_latents": torch.from_numpy(row["rejected_latents"]).reshape(shape),
            "prompt_embeds": torch.from_numpy(prompt["prompt_embeds"]),
            "label": torch.tensor(float(row["label"])),
        }
        for name in OPTIONAL_PROMPT_COLUMNS:  # as the base's family has them
            if name in prompt:
                item[name] = torch.from_numpy(prompt[name])
        return item

    @cached_property
    def bucket_ids(self) -> list[tuple[int, int]]:
        """The latent `(height, width)` of every pair."""
        sizes = self.pairs.select_columns(["latent_height", "latent_width"]).with_format("numpy")[:]
        return list(zip(sizes["latent_height"].tolist(), sizes["latent_width"].tolist()))


def load_cached_preferences(cache_dir: str | os.PathLike) -> CachedPreferenceDataset:
    """Open a complete cache folder written by `cache_preference_dataset`."""
    info = _read_json(os.path.join(cache_dir, CACHE_INFO_NAME))
    if info is None:
        raise FileNotFoundError(f"{cache_dir!r} is not a preference cache (no {CACHE_INFO_NAME}).")
    if not info.get("complete"):
        raise ValueError(f"the cache in {cache_dir!r} is incomplete: rerun `cache_preference_dataset` to finish it.")
    shards = [os.path.join(cache_dir, _SHARDS, f"{i:05d}") for i in range(info["num_shards"])]
    parts = {
        name: [load_from_disk(p) for s in shards if os.path.isdir(p := os.path.join(s, name))]
        for name in ("pairs", "prompts")
    }
    if not parts["pairs"]:
        raise ValueError(f"the cache in {cache_dir!r} holds no pairs (see {SKIPPED_ROWS_NAME}).")
    pairs, prompts = concatenate_datasets(parts["pairs"]), concatenate_datasets(parts["prompts"])
    return CachedPreferenceDataset(pairs, prompts, info["latent_channels"])


# ----------------------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------------------
def cache_preference_dataset(
    dataset: Dataset,
    base_or_pipeline,
    output_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_sequence_length: int = 128,
    resolution: int | None = None,
    buckets: Sequence[tuple[int, int]] | None = None,
    max_aspect_ratio: float = 3.0,
    bucket_policy: str = "dense",
    sample_posterior: bool = False,
    shard_size: int = 1000,
    storage_dtype: str = "float32",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CachedPreferenceDataset:
    """Encode a pair dataset (`modeling_dina.data` schema) into `output_dir` and return it as a
    `CachedPreferenceDataset`; finished shards of an earlier, interrupted run are kept.

    Args:
        base_or_pipeline: the base pipeline's folder or Hub id, or a loaded pipeline of its family
            (`StableDiffusion3Pipeline`, `FluxPipeline`, `QwenImagePipeline`, `ZImagePipeline`; the transformer is
            read for the geometry only).
        batch_size: images (and prompts) per encoder call.
        max_sequence_length: T5 tokens of the prompt encoding (the release trained with 128).
        resolution: side of the square of the buckets' area in pixels (default: the base's native size).
        buckets: explicit `(width, height)` buckets instead of those made from `resolution` (e.g. one square).
        bucket_policy: `"dense"` (buckets of about `resolution**2` pixels, each image centre-cropped to its pair's
            bucket) or `"released"` (the authors' recipe: `RELEASED_BUCKETS`, pairs below 256² dropped, stretched
            with LANCZOS).
        sample_posterior: store a sample of the VAE posterior instead of its mean (the release trained on
            `latent_dist.sample()`); seeded per shard, so an interrupted run resumes identically.
        shard_size: pairs per shard (the unit of resumption).
        storage_dtype: `"float32"` or `"float16"` for the stored latents and embeddings.
        device, dtype: where and in which dtype the text encoders run (the VAE of a loaded folder runs in fp32).
    """
    if bucket_policy not in BUCKET_POLICIES:
        raise ValueError(f"bucket_policy must be one of {BUCKET_POLICIES}, got {bucket_policy!r}")
    if bucket_policy == "released" and (buckets is not None or resolution is not None):
        raise ValueError("the released bucket policy has its own buckets: leave `buckets` and `resolution` unset.")
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype must be 'float32' or 'float16', got {storage_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    pairs = validate_pairs(dataset)
    pairs = pairs.cast_column("chosen", Image(decode=False)).cast_column("rejected", Image(decode=False))
    base = base_or_pipeline if isinstance(base_or_pipeline, (str, os.PathLike)) else base_or_pipeline.name_or_path
    settings = {
        "base": os.fspath(base or ""),
        "num_rows": len(pairs),
        "prompts_sha256": hashlib.sha256(
            "\n".join("" if p is None else p for p in pairs["prompt"]).encode()
        ).hexdigest(),
        "max_sequence_length": max_sequence_length,
        "resolution": resolution,
        "buckets": [list(b) for b in buckets] if buckets is not None else None,
        "max_aspect_ratio": max_aspect_ratio,
        "bucket_policy": bucket_policy,
        "sample_posterior": sample_posterior,
        "shard_size": shard_size,
        "storage_dtype": storage_dtype,
    }
    info = read_cache_info(output_dir, settings)
    if info is not None and info.get("complete"):
        return load_cached_preferences(output_dir)  # done before: the encoders are not even loaded

    pipe = load_encoders(base_or_pipeline, device=device, dtype=dtype)
    multiple, max_side, native, latent_channels = base_geometry(base_or_pipeline, pipe)
    if bucket_policy == "released":
        buckets = [b for tier in RELEASED_BUCKETS.values() for b in tier]
    elif buckets is None:
        buckets = make_buckets(resolution or native, multiple, max_aspect_ratio=max_aspect_ratio, max_side=max_side)
    buckets = [tuple(int(v) for v in b) for b in buckets]
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple or (max_side and max(b) > max_side)]
    if bad:
        raise ValueError(f"buckets {bad} are not multiples of {multiple} or exceed the largest side {max_side}")
    settings.update(latent_channels=latent_channels, bucket_sizes=[list(b) for b in buckets])

    def write_shard(rows, folder, prompt_index):
        _write_shard(pairs, rows, folder, pipe, prompt_index, buckets, settings, batch_size)

    return fill_cache(output_dir, settings, len(pairs), shard_size, write_shard, progress=progress)


def read_cache_info(output_dir, settings: dict) -> dict | None:
    """The `cache_info.json` of `output_dir` (None if there is none), refused when made with other `settings`."""
    info = _read_json(os.path.join(output_dir, CACHE_INFO_NAME))
    if info is not None:
        info = {**_SETTINGS_ADDED_LATER, **info}
    if info is not None and {k: info.get(k) for k in settings} != settings:
        changed = sorted(k for k in settings if info.get(k) != settings[k])
        raise ValueError(
            f"{os.fspath(output_dir)!r} holds a cache made with other settings ({', '.join(changed)} differ): "
            "use another output_dir or delete it."
        )
    return info


def fill_cache(output_dir, settings: dict, num_rows: int, shard_size: int, write_shard, *, progress: bool = True):
    """Write the shards of a cache folder that are missing, then mark it complete and open it.

    `write_shard(rows, folder, prompt_index)` encodes the source rows `rows` (a range) into `folder` atomically (see
    `write_cache_part`), indexing prompts after those of earlier shards (`prompt_index`, prompt -> row, not modified).
    """
    info_path = os.path.join(output_dir, CACHE_INFO_NAME)
    os.makedirs(os.path.join(output_dir, _SHARDS), exist_ok=True)
    _write_json(info_path, settings)
    num_shards = max(1, math.ceil(num_rows / shard_size))
    prompt_index: dict[str, int] = {}
    skipped: list[dict] = []
    bar = tqdm(total=num_rows, desc="Caching preference pairs", unit="pair", disable=not progress)
    for shard in range(num_shards):
        folder = os.path.join(output_dir, _SHARDS, f"{shard:05d}")
        rows = range(shard * shard_size, min(num_rows, (shard + 1) * shard_size))
        if not os.path.isdir(folder):
            write_shard(rows, folder, prompt_index)
        if os.path.isdir(os.path.join(folder, "prompts")):
            for prompt in load_from_disk(os.path.join(folder, "prompts"))["prompt"]:
                prompt_index.setdefault(prompt, len(prompt_index))
        skipped.extend(_read_json(os.path.join(folder, SKIPPED_ROWS_NAME)))
        bar.update(len(rows))
    bar.close()

    _write_json(os.path.join(output_dir, SKIPPED_ROWS_NAME), skipped)
    if skipped:
        logger.warning(
            f"{len(skipped)} of {num_rows} rows were skipped; see {os.path.join(output_dir, SKIPPED_ROWS_NAME)}"
        )
    _write_json(
        info_path, {**settings, "complete": True, "num_shards": num_shards, "num_pairs": num_rows - len(skipped)}
    )
    return load_cached_preferences(output_dir)


class _Pair(NamedTuple):
    row: int
    prompt: str
    label: float
    bucket: tuple[int, int]
    images: dict[str, torch.Tensor]


def _read_pairs(pairs: Dataset, rows: range, buckets, policy: str) -> tuple[list[_Pair], list[dict]]:
    """Decode the images of `rows` with the image processor; rows with an unreadable (or missing) image, no prompt
    or (released policy) images below the smallest bucket area are logged and listed, not returned."""
    batch = pairs.select(rows).select_columns(["prompt", "chosen", "rejected", "label"])[:]
    processor = DiNaImageProcessor()
    items, skipped = [], []
    for offset, row in enumerate(rows):
        if not isinstance(batch["prompt"][offset], str):
            logger.warning(f"row {row}: the prompt is {batch['prompt'][offset]!r}, not a string; skipped")
            skipped.append({"row": row, "column": "prompt", "error": f"prompt is {batch['prompt'][offset]!r}"})
            continue
        images = {}
        for side in ("chosen", "rejected"):
            try:
                images[side] = processor.to_tensor(batch[side][offset], f"row {row} {side}")
            except Exception as err:  # any decoding failure: report the row, never drop it silently
                cause = err.__cause__ or err
                logger.warning(f"row {row}: cannot read the {side} image ({type(cause).__name__}: {err}); skipped")
                skipped.append({"row": row, "column": side, "error": f"{type(cause).__name__}: {err}"})
                break
        else:
            sizes = [tuple(image.shape[-2:]) for image in images.values()]  # (height, width) each
            bucket = pair_bucket(sizes, buckets, policy)
            if bucket is None:
                logger.warning(f"row {row}: images {sizes} are below the smallest released bucket area; skipped")
                skipped.append({"row": row, "column": "chosen", "error": f"below {RELEASED_MIN_AREA} pixels"})
                continue
            items.append(_Pair(row, batch["prompt"][offset], float(batch["label"][offset]), bucket, images))
    return items, skipped


def _write_shard(pairs, rows, folder, pipe, prompt_index, buckets, settings, batch_size) -> None:
    """Encode the pairs `rows` and their new prompts into `folder` (`write_cache_part`). Images are decoded, fitted
    and encoded `batch_size` rows at a time, so memory does not grow with the shard."""
    policy, sample = settings["bucket_policy"], settings["sample_posterior"]
    mode = "stretch" if policy == "released" else "crop"
    generator = torch.Generator().manual_seed(int(os.path.basename(folder)))  # posterior samples, resumable
    encoded, skipped = [], []
    for start in range(rows.start, rows.stop, batch_size):
        chunk, bad = _read_pairs(pairs, range(start, min(start + batch_size, rows.stop)), buckets, policy)
        skipped.extend(bad)
        latents = {}
        for bucket in sorted({item.bucket for item in chunk}):
            group = [item for item in chunk if item.bucket == bucket]
            for side in ("chosen", "rejected"):
                pixels = torch.stack([image_to_pixels(item.images[side], bucket, mode=mode) for item in group])
                z = encode_images(pipe, pixels, batch_size=batch_size, sample_posterior=sample, generator=generator)
                latents.update({(item.row, side): value for item, value in zip(group, z.numpy())})
        encoded.extend(
            (item.row, item.prompt, item.label, latents[item.row, "chosen"], latents[item.row, "rejected"])
            for item in chunk
        )
    write_cache_part(folder, encoded, skipped, prompt_index, pipe, settings, batch_size)


def write_cache_part(folder, pairs, skipped, prompt_index, pipe, settings, batch_size) -> None:
    """Write one shard into `folder`, atomically: the `pairs` `(row, prompt, label, chosen, rejected)` with `(C, h, w)`
    latents, the prompts not in `prompt_index` encoded with `pipe`, and the `skipped` rows (`datasets` cannot reload
    an empty saved dataset, so an empty part is left out)."""
    dtype, max_length = settings["storage_dtype"], settings["max_sequence_length"]
    tmp = f"{folder}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)

    new_prompts = list(dict.fromkeys(prompt for _, prompt, *_ in pairs if prompt not in prompt_index))
    if new_prompts:
        encoded = encode_prompts(pipe, new_prompts, max_sequence_length=max_length, batch_size=batch_size)
        features = {
            "prompt": Value("string"),
            "prompt_embeds": Array2D(shape=tuple(encoded.embeds.shape[1:]), dtype=dtype),
        }
        columns = {"prompt": new_prompts, "prompt_embeds": encoded.embeds.numpy()}
        for name, values, value_type in (
            ("pooled_prompt_embeds", encoded.pooled, dtype),
            ("prompt_embeds_mask", encoded.mask, "bool"),
        ):
            if values is not None:
                features[name] = List(Value(value_type), length=values.shape[1])
                columns[name] = values.numpy()
        Dataset.from_dict(columns, features=Features(features)).save_to_disk(os.path.join(tmp, "prompts"))
    index = {**prompt_index, **{p: len(prompt_index) + i for i, p in enumerate(new_prompts)}}

    if pairs:
        rows, prompts, labels, chosen, rejected = zip(*pairs)
        columns = {
            "row": list(rows),
            "prompt": list(prompts),
            "prompt_index": [index[prompt] for prompt in prompts],
            "label": list(labels),
            "latent_height": [z.shape[1] for z in chosen],
            "latent_width": [z.shape[2] for z in chosen],
            "chosen_latents": [z.ravel() for z in chosen],
            "rejected_latents": [z.ravel() for z in rejected],
        }
        features = {
            "row": Value("int64"),
            "prompt": Value("string"),
            "prompt_index": Value("int64"),
            "label": Value("float32"),
            "latent_height": Value("int32"),
            "latent_width": Value("int32"),
            "chosen_latents": List(Value(dtype)),
            "rejected_latents": List(Value(dtype)),
        }
        Dataset.from_dict(columns, features=Features(features)).save_to_disk(os.path.join(tmp, "pairs"))
    _write_json(os.path.join(tmp, SKIPPED_ROWS_NAME), skipped)
    os.replace(tmp, folder)


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


__all__ = [
    "CachedPreferenceDataset",
    "cache_preference_dataset",
    "encode_images",
    "encode_prompts",
    "image_to_pixels",
    "load_cached_preferences",
    "load_encoders",
    "make_buckets",
    "nearest_bucket",
]
