"""Import the DiNa-LRM authors' preprocessed preference data into a training cache: their latents are used as they
are, so no image is decoded or VAE-encoded again.

Their layout (`tools/data_process/prepare_dataset.py` in github.com/HKUST-C4G/diffusion-rm, read by their
`diffusion_rm/data/bucket_dataset.py`): parquet files (`part_rankNN.parquet`), one row per pair, with

- `prompt` (string);
- `latent1`, `latent2` (binary): `np.save` bytes (no pickle) of one float32 `(C, h, w)` array each, the VAE posterior
  *sample* already shifted and scaled, `(z - shift_factor) * scaling_factor`; **`latent1` is the chosen image**;
- `latent1_shape`, `latent2_shape` (list of int64), and `model1`, `model2`, `image1_path`, `image2_path`,
  `detailed_results` (strings; not needed here).

The files hold no prompt embeddings (their trainer encodes prompts at every step), so each distinct prompt is encoded
once here with the base's text encoders. Their `create_bucket_index.py` writes a `bucket_index.csv` (`parquet_path`,
`row_group`, `row_index`, ...) of the rows they train on (at most 8 pairs per prompt, optionally filtered by votes);
pass it as `index` to import only those rows. Latents are read with `np.load(..., allow_pickle=False)`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow.parquet as pq

from .caching import (
    CachedPreferenceDataset,
    fill_cache,
    load_cached_preferences,
    load_encoders,
    read_cache_info,
    write_cache_part,
)
from .encoders import base_geometry

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "latent1", "latent2")
"""The columns read; `latent1` is the chosen image's latent, `latent2` the rejected one's."""


def released_parquet_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The parquet files of `source`: a file, a folder (its `*.parquet`), a glob pattern or a list of those."""
    if not isinstance(source, (str, os.PathLike)):
        return sorted(f for item in source for f in released_parquet_files(item))
    source = os.fspath(source)
    if os.path.isdir(source):
        files = glob.glob(os.path.join(source, "*.parquet"))
    else:
        files = glob.glob(source) if glob.has_magic(source) else [source] if os.path.isfile(source) else []
    if not files:
        raise FileNotFoundError(f"no parquet files at {source!r} (give a file, a folder or a glob pattern)")
    return sorted(files)


def _positions(files: list[str], index: str | os.PathLike | None) -> list[tuple[int, int, int]]:
    """`(file, row group, row in group)` of every row to import, in file order, from the parquet metadata alone."""
    selected = None
    if index is not None:
        with open(index, newline="") as f:
            selected = {
                (os.path.basename(r["parquet_path"]), int(r["row_group"]), int(r["row_index"]))
                for r in csv.DictReader(f)
            }
    positions = []
    for number, path in enumerate(files):
        metadata = pq.ParquetFile(path).metadata
        missing = set(COLUMNS) - set(metadata.schema.names)
        if missing:
            raise ValueError(f"{path}: not the authors' layout, columns {sorted(missing)} are missing")
        name = os.path.basename(path)
        for group in range(metadata.num_row_groups):
            for row in range(metadata.row_group(group).num_rows):
                if selected is None or (name, group, row) in selected:
                    positions.append((number, group, row))
    return positions


def decode_latent(cell: bytes, latent_channels: int, patch_size: int, max_size: int | None = None) -> np.ndarray:
    """One `np.save`d latent as a float32 `(C, h, w)` array, checked against the base: its VAE's channels, its patch
    size and the largest latent side its position table allows (`max_size`)."""
    if not isinstance(cell, bytes):
        raise ValueError(f"expected npy bytes, got {type(cell).__name__}")
    array = np.load(io.BytesIO(cell), allow_pickle=False)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected a float (C, h, w) latent, got {array.dtype} of shape {array.shape}")
    if array.shape[0] != latent_channels:
        raise ValueError(f"the latent has {array.shape[0]} channels, the base's VAE {latent_channels}")
    if array.shape[1] % patch_size or array.shape[2] % patch_size:
        raise ValueError(f"latent size {array.shape[1:]} is not a multiple of the patch size {patch_size}")
    if max_size is not None and max(array.shape[1:]) > max_size:
        raise ValueError(f"latent size {array.shape[1:]} exceeds the base's largest latent side {max_size}")
    if not np.isfinite(array).all():
        raise ValueError("the latent contains NaN or infinite values")
    return array.astype(np.float32)


def _read_rows(files, positions, rows, geometry) -> tuple[list, list[dict]]:
    """The pairs `(row, prompt, 1.0, chosen, rejected)` at `positions[rows]` and the rows that failed, with why."""
    tables, pairs, skipped = {}, [], []
    for row in rows:
        number, group, offset = positions[row]
        if (number, group) not in tables:
            tables = {(number, group): pq.ParquetFile(files[number]).read_row_group(group, columns=list(COLUMNS))}
        record = {name: tables[number, group].column(name)[offset].as_py() for name in COLUMNS}
        where = {"row": row, "file": os.path.basename(files[number]), "row_group": group, "row_index": offset}
        try:
            chosen, rejected = (decode_latent(record[name], *geometry) for name in ("latent1", "latent2"))
            if chosen.shape != rejected.shape:
                raise ValueError(f"chosen latent {chosen.shape} and rejected {rejected.shape} differ in size")
            if not isinstance(record["prompt"], str):
                raise ValueError("the prompt is missing")
        except ValueError as err:
            logger.warning(f"row {row} ({where['file']}, group {group}, row {offset}): {err}; skipped")
            skipped.append({**where, "error": str(err)})
            continue
        pairs.append((row, record["prompt"], 1.0, chosen, rejected))
    return pairs, skipped


def import_released_data(
    source,
    base_or_pipeline,
    output_dir: str | os.PathLike,
    *,
    index: str | os.PathLike | None = None,
    max_sequence_length: int = 128,
    batch_size: int = 8,
    shard_size: int = 1000,
    storage_dtype: str = "float32",
    device=None,
    dtype=None,
    progress: bool = True,
) -> CachedPreferenceDataset:
    """Import the authors' parquet files (`source`: file, folder, glob or list) into the cache folder `output_dir`
    (the layout of `cache_preference_dataset`, resumable shard by shard) and open it.

    `base_or_pipeline` is the base their latents come from (its VAE config fixes the channel count; its text encoders
    encode the prompts, `max_sequence_length` T5 tokens). Rows whose latents cannot be read, or whose chosen and
    rejected latents differ in size, are logged and listed in `skipped_rows.json`.
    """
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype must be 'float32' or 'float16', got {storage_dtype!r}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    files = released_parquet_files(source)
    positions = _positions(files, index)
    if not positions:
        raise ValueError(f"no rows to import from {len(files)} parquet file(s) (an index that matches no row?)")
    base = base_or_pipeline if isinstance(base_or_pipeline, (str, os.PathLike)) else base_or_pipeline.name_or_path
    listing = "\n".join(f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in files) + f"\n{positions}"
    settings = {
        "format": "released_parquet",
        "base": os.fspath(base or ""),
        "num_rows": len(positions),
        "source_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "max_sequence_length": max_sequence_length,
        "shard_size": shard_size,
        "storage_dtype": storage_dtype,
    }
    info = read_cache_info(output_dir, settings)
    if info is not None and info.get("complete"):
        return load_cached_preferences(output_dir)

    pipe = load_encoders(base_or_pipeline, device=device, dtype=dtype)
    multiple, max_side, _, channels = base_geometry(base_or_pipeline, pipe)
    factor = pipe.vae_scale_factor
    geometry = (channels, multiple // factor, max_side // factor if max_side else None)
    settings["latent_channels"] = channels

    def write_shard(rows, folder, prompt_index):
        pairs, skipped = _read_rows(files, positions, rows, geometry)
        write_cache_part(folder, pairs, skipped, prompt_index, pipe, settings, batch_size)

    return fill_cache(output_dir, settings, len(positions), shard_size, write_shard, progress=progress)


__all__ = ["COLUMNS", "decode_latent", "import_released_data", "released_parquet_files"]
