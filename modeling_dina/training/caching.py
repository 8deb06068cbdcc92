"""Encode preference pairs once (VAE latents, prompt embeddings) so that no training step runs the VAE or the text
encoders.

A cache folder holds:

- `cache_info.json`: the settings it was made with (a rerun with other settings is refused) and, once complete,
  the totals;
- `shards/NNNNN/pairs` and `shards/NNNNN/prompts`: `datasets` folders (`save_to_disk`). Pair rows hold the source
  `row`, `prompt`, `prompt_index` (a row of the concatenated prompt shards), `label`, the latent size and the
  chosen/rejected latents (flat); prompt rows hold each distinct prompt once with its `prompt_embeds` (L, D) and
  `pooled_prompt_embeds`;
- `skipped_rows.json`: the rows left out because an image could not be read (a missing file included) or the prompt
  is not a string (also logged as warnings).

Each shard is written to a temporary folder and renamed when complete, so an interrupted run resumes at the first
missing shard. Images are resized and centre-cropped to the nearest aspect-ratio bucket (sides multiples of the
VAE factor times the patch size, 16 for SD3) and chosen and rejected of a pair share a bucket, so pairs of one
bucket batch together.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
from datasets import Array2D, Dataset, Features, Image, List, Value, concatenate_datasets, load_from_disk
from diffusers import StableDiffusion3Pipeline
from PIL import Image as PILImage
from PIL import ImageOps
from tqdm.auto import tqdm

from ..backbones import read_backbone_config, resolve_base_folder
from ..data import validate_pairs

logger = logging.getLogger(__name__)

CACHE_INFO_NAME = "cache_info.json"
SKIPPED_ROWS_NAME = "skipped_rows.json"
_SHARDS = "shards"


# ----------------------------------------------------------------------------------------------------------
# Buckets and encoders
# ----------------------------------------------------------------------------------------------------------
def make_buckets(
    resolution: int, multiple: int, *, max_aspect_ratio: float = 3.0, max_side: int | None = None
) -> list[tuple[int, int]]:
    """`(width, height)` sizes, both multiples of `multiple` and at most `max_side`, of about `resolution**2` pixels
    with aspect ratios up to `max_aspect_ratio`."""
    if resolution < multiple or max_aspect_ratio < 1:
        raise ValueError(
            f"need resolution >= {multiple} and max_aspect_ratio >= 1, got {resolution}, {max_aspect_ratio}."
        )
    limit = max_side or math.ceil(resolution * math.sqrt(max_aspect_ratio))
    buckets = set()
    for height in range(multiple, limit + 1, multiple):
        width = min(max(multiple, round(resolution**2 / height / multiple) * multiple), limit // multiple * multiple)
        if 1 / max_aspect_ratio <= width / height <= max_aspect_ratio:
            buckets.add((width, height))
    if not buckets:
        raise ValueError(f"no bucket fits resolution {resolution} with sides <= {limit}")
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest (in log scale) to `width / height`."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - target), -b[0] * b[1]))


def load_encoders(
    base_or_pipeline, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> StableDiffusion3Pipeline:
    """The base's text encoders and VAE as a `StableDiffusion3Pipeline` without its transformer.

    A folder or Hub id is loaded with the text encoders in `dtype` and the VAE in fp32; a loaded pipeline is used as
    it is.
    """
    if not isinstance(base_or_pipeline, (str, os.PathLike)):
        return base_or_pipeline
    dtypes = {"default": dtype or torch.float32, "vae": torch.float32}
    pipe = StableDiffusion3Pipeline.from_pretrained(os.fspath(base_or_pipeline), transformer=None, dtype=dtypes)
    return pipe.to(device) if device is not None else pipe


@torch.no_grad()
def encode_prompts(
    pipe, prompts: Sequence[str], *, max_sequence_length: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3 prompt embeddings `(N, L, D)` and pooled embeddings `(N, P)` (fp32, CPU), `batch_size` prompts a call."""
    embeds, pooled = [], []
    for start in range(0, len(prompts), batch_size):
        e, _, p, _ = pipe.encode_prompt(
            list(prompts[start : start + batch_size]),
            None,
            None,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        embeds.append(e.float().cpu())
        pooled.append(p.float().cpu())
    return torch.cat(embeds), torch.cat(pooled)


def image_to_pixels(image: PILImage.Image, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image resized and centre-cropped to `size` = (width, height), as a `(3, H, W)` tensor in [-1, 1]."""
    image = ImageOps.fit(image.convert("RGB"), size, method=PILImage.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@torch.no_grad()
def encode_images(pipe, pixels: torch.Tensor, *, batch_size: int) -> torch.Tensor:
    """VAE latents `(mean - shift_factor) * scaling_factor` (fp32, CPU) of `(N, 3, H, W)` pixels in [-1, 1]."""
    vae = pipe.vae
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    latents = []
    for start in range(0, len(pixels), batch_size):
        batch = pixels[start : start + batch_size].to(vae.device, vae.dtype)
        latents.append(((vae.encode(batch).latent_dist.mean.float() - shift) * scale).cpu())
    return torch.cat(latents)


def read_image(cell: dict) -> PILImage.Image:
    """Decode an undecoded `datasets.Image` cell (`bytes` or `path`), fully, as RGB."""
    source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell.get("path")
    if source is None:
        raise ValueError("the image cell has neither bytes nor a path")
    with PILImage.open(source) as image:
        image.load()
        return ImageOps.exif_transpose(image).convert("RGB")


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
        return {
            "chosen_latents": torch.from_numpy(row["chosen_latents"]).reshape(shape),
            "rejected_latents": torch.from_numpy(row["rejected_latents"]).reshape(shape),
            "prompt_embeds": torch.from_numpy(prompt["prompt_embeds"]),
            "pooled_prompt_embeds": torch.from_numpy(prompt["pooled_prompt_embeds"]),
            "label": torch.tensor(float(row["label"])),
        }

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
    shard_size: int = 1000,
    storage_dtype: str = "float32",
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> CachedPreferenceDataset:
    """Encode a pair dataset (`modeling_dina.data` schema) into `output_dir` and return it as a
    `CachedPreferenceDataset`; finished shards of an earlier, interrupted run are kept.

    Args:
        base_or_pipeline: the base pipeline's folder or Hub id, or a loaded `StableDiffusion3Pipeline`.
        batch_size: images (and prompts) per encoder call.
        max_sequence_length: T5 tokens of the prompt encoding (the release trained with 128).
        resolution: side of the square of the buckets' area in pixels (default: the base's native size).
        buckets: explicit `(width, height)` buckets instead of those made from `resolution` (e.g. one square).
        shard_size: pairs per shard (the unit of resumption).
        storage_dtype: `"float32"` or `"float16"` for the stored latents and embeddings.
        device, dtype: where and in which dtype the text encoders run (the VAE of a loaded folder runs in fp32).
    """
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
        "shard_size": shard_size,
        "storage_dtype": storage_dtype,
    }
    info = read_cache_info(output_dir, settings)
    if info is not None and info.get("complete"):
        return load_cached_preferences(output_dir)  # done before: the encoders are not even loaded

    pipe = load_encoders(base_or_pipeline, device=device, dtype=dtype)
    multiple, max_side, native = _geometry(base_or_pipeline, pipe)
    if buckets is None:
        buckets = make_buckets(resolution or native, multiple, max_aspect_ratio=max_aspect_ratio, max_side=max_side)
    buckets = [tuple(int(v) for v in b) for b in buckets]
    bad = [b for b in buckets if b[0] % multiple or b[1] % multiple or (max_side and max(b) > max_side)]
    if bad:
        raise ValueError(f"buckets {bad} are not multiples of {multiple} or exceed the largest side {max_side}")
    settings.update(latent_channels=pipe.vae.config.latent_channels, bucket_sizes=[list(b) for b in buckets])

    def write_shard(rows, folder, prompt_index):
        _write_shard(pairs, rows, folder, pipe, prompt_index, buckets, settings, batch_size)

    return fill_cache(output_dir, settings, len(pairs), shard_size, write_shard, progress=progress)


def read_cache_info(output_dir, settings: dict) -> dict | None:
    """The `cache_info.json` of `output_dir` (None if there is none), refused when made with other `settings`."""
    info = _read_json(os.path.join(output_dir, CACHE_INFO_NAME))
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
    images: dict[str, PILImage.Image]


def _read_pairs(pairs: Dataset, rows: range, buckets) -> tuple[list[_Pair], list[dict]]:
    """Decode the images of `rows`; rows with an unreadable (or missing) image or no prompt are logged and listed,
    not returned."""
    batch = pairs.select(rows).select_columns(["prompt", "chosen", "rejected", "label"])[:]
    items, skipped = [], []
    for offset, row in enumerate(rows):
        if not isinstance(batch["prompt"][offset], str):
            logger.warning(f"row {row}: the prompt is {batch['prompt'][offset]!r}, not a string; skipped")
            skipped.append({"row": row, "column": "prompt", "error": f"prompt is {batch['prompt'][offset]!r}"})
            continue
        images = {}
        for side in ("chosen", "rejected"):
            try:
                images[side] = read_image(batch[side][offset])
            except Exception as err:  # any decoding failure: report the row, never drop it silently
                logger.warning(f"row {row}: cannot read the {side} image ({type(err).__name__}: {err}); skipped")
                skipped.append({"row": row, "column": side, "error": f"{type(err).__name__}: {err}"})
                break
        else:
            chosen, rejected = images["chosen"], images["rejected"]
            aspect = math.sqrt(chosen.width * rejected.width / (chosen.height * rejected.height))
            bucket = nearest_bucket(aspect, 1.0, buckets)
            items.append(_Pair(row, batch["prompt"][offset], float(batch["label"][offset]), bucket, images))
    return items, skipped


def _write_shard(pairs, rows, folder, pipe, prompt_index, buckets, settings, batch_size) -> None:
    """Encode the pairs `rows` and their new prompts into `folder`, atomically."""
    items, skipped = _read_pairs(pairs, rows, buckets)
    latents: dict[tuple[int, str], np.ndarray] = {}
    for bucket in sorted({item.bucket for item in items}):
        group = [item for item in items if item.bucket == bucket]
        for side in ("chosen", "rejected"):
            pixels = torch.stack([image_to_pixels(item.images[side], bucket) for item in group])
            for item, z in zip(group, encode_images(pipe, pixels, batch_size=batch_size).numpy()):
                latents[item.row, side] = z
    encoded = [
        (item.row, item.prompt, item.label, latents[item.row, "chosen"], latents[item.row, "rejected"])
        for item in items
    ]
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
        embeds, pooled = encode_prompts(pipe, new_prompts, max_sequence_length=max_length, batch_size=batch_size)
        features = {
            "prompt": Value("string"),
            "prompt_embeds": Array2D(shape=tuple(embeds.shape[1:]), dtype=dtype),
            "pooled_prompt_embeds": List(Value(dtype), length=pooled.shape[1]),
        }
        columns = {"prompt": new_prompts, "prompt_embeds": embeds.numpy(), "pooled_prompt_embeds": pooled.numpy()}
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


def _geometry(base_or_pipeline, pipe) -> tuple[int, int | None, int]:
    """Bucket multiple (VAE factor x patch size), the largest side the position table allows, the native side."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        config = dict(transformer.config)
    elif isinstance(base_or_pipeline, (str, os.PathLike)):
        config = read_backbone_config(resolve_base_folder(os.fspath(base_or_pipeline)))
    else:
        raise ValueError("a pipeline without its transformer: pass the base folder or Hub id instead")
    factor, patch = pipe.vae_scale_factor, config["patch_size"]
    max_patches = config.get("pos_embed_max_size")
    max_side = max_patches * patch * factor if max_patches else None
    return factor * patch, max_side, config["sample_size"] * factor


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
    "read_image",
]
