"""The importer of the DiNa-LRM authors' preprocessed parquet latents, on files written in their layout here."""

import csv
import io
import json

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from modeling_dina.cli import main as dina_main
from modeling_dina.training import released_data
from modeling_dina.training.caching import encode_prompts, load_cached_preferences
from modeling_dina.training.released_data import import_released_data

PROMPTS = ["a red circle", "a blue square", "a red circle"]
# The authors' `prepare_dataset.py` schema: `latent1` (chosen) and `latent2` as np.save bytes, their shapes, metadata.
SCHEMA = pa.schema(
    [
        ("prompt", pa.string()),
        ("model1", pa.string()),
        ("model2", pa.string()),
        ("detailed_results", pa.string()),
        ("image1_path", pa.string()),
        ("image2_path", pa.string()),
        ("latent1", pa.binary()),
        ("latent2", pa.binary()),
        ("latent1_shape", pa.list_(pa.int64())),
        ("latent2_shape", pa.list_(pa.int64())),
    ]
)


@pytest.fixture(autouse=True)
def _quiet_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def pipe(tiny_sd3_dir):
    return StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)


def npy(array: np.ndarray, allow_pickle=False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def record(prompt, chosen, rejected, index):
    return {
        "prompt": prompt,
        "model1": "model-a",
        "model2": "model-b",
        "detailed_results": str({"votes_chosen": 3, "votes_rejected": 1}),
        "image1_path": f"images/{index}_1.png",
        "image2_path": f"images/{index}_2.png",
        "latent1": chosen if isinstance(chosen, bytes) else npy(chosen),
        "latent2": rejected if isinstance(rejected, bytes) else npy(rejected),
        "latent1_shape": [4, 8, 8],
        "latent2_shape": [4, 8, 8],
    }


def write_part(path, records, row_group_size=2):
    table = pa.Table.from_pydict({name: [r[name] for r in records] for name in SCHEMA.names}, schema=SCHEMA)
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


@pytest.fixture()
def released(tmp_path, pipe):
    """Two parquet parts in the authors' layout: five good pairs (two sizes) and three bad rows."""
    channels = pipe.vae.config.latent_channels
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal((channels, *size)).astype(np.float32) for size in [(8, 8)] * 6 + [(4, 8)] * 4]
    good = [record(PROMPTS[i % 3], latents[2 * i], latents[2 * i + 1], i) for i in range(5)]
    pickled = npy(np.array([{"not": "a latent"}], dtype=object), allow_pickle=True)
    bad = [
        record("a pickle", pickled, latents[0], 5),  # refused by np.load(allow_pickle=False), never unpickled
        record("two sizes", latents[0], latents[8], 6),  # chosen 8x8, rejected 4x8
        record("wrong channels", latents[0][:1], latents[1][:1], 7),
    ]
    folder = tmp_path / "preprocess"
    folder.mkdir()
    write_part(folder / "part_rank00.parquet", [good[0], bad[0], good[1], good[2]])
    write_part(folder / "part_rank01.parquet", [bad[1], good[3], bad[2], good[4]])
    return folder, latents


def test_import_keeps_the_latents_and_encodes_each_prompt_once(released, pipe, tmp_path, monkeypatch):
    folder, latents = released
    cache = import_released_data(folder, pipe, tmp_path / "cache", max_sequence_length=16, shard_size=3)
    assert len(cache) == 5
    encoded = encode_prompts(pipe, PROMPTS[:2], max_sequence_length=16, batch_size=8)
    embeds, pooled = encoded.embeds, encoded.pooled
    for i in range(5):
        item = cache[i]
        assert torch.equal(item["chosen_latents"], torch.from_numpy(latents[2 * i]))  # latent1 is the chosen image
        assert torch.equal(item["rejected_latents"], torch.from_numpy(latents[2 * i + 1]))
        assert item["label"] == 1.0
        torch.testing.assert_close(item["prompt_embeds"], embeds[i % 3 % 2])
        torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[i % 3 % 2])
    assert sorted(set(cache.bucket_ids)) == [(4, 8), (8, 8)]
    assert len(cache.prompts) == 2  # "a red circle" twice, encoded once across shards
    skipped = json.loads((tmp_path / "cache" / "skipped_rows.json").read_text())
    assert [(s["file"], s["row_group"], s["row_index"]) for s in skipped] == [
        ("part_rank00.parquet", 0, 1),
        ("part_rank01.parquet", 0, 0),
        ("part_rank01.parquet", 1, 0),
    ]
    assert "allow_pickle" in skipped[0]["error"] and "differ in size" in skipped[1]["error"]
    assert "channels" in skipped[2]["error"]
    # Complete: reopened without loading the encoders; other settings are refused.
    monkeypatch.setattr(released_data, "load_encoders", None)
    assert len(import_released_data(folder, pipe, tmp_path / "cache", max_sequence_length=16, shard_size=3)) == 5
    with pytest.raises(ValueError, match="other settings"):
        import_released_data(folder, pipe, tmp_path / "cache", max_sequence_length=8, shard_size=3)


def test_bucket_index_and_the_cli(released, tiny_sd3_dir, tmp_path, capsys):
    folder, latents = released
    index = tmp_path / "bucket_index.csv"
    with index.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["global_id", "parquet_path", "row_group", "row_index", "width", "height", "bucket_id"])
        writer.writerow([0, "/their/disk/part_rank00.parquet", 1, 0, 64, 64, 0])  # good[1]
        writer.writerow([1, "/their/disk/part_rank01.parquet", 1, 1, 64, 32, 1])  # good[4]
    args = ["cache", str(folder / "part_rank*.parquet"), "--format", "released", "--base", tiny_sd3_dir]
    dina_main([*args, "--output", str(tmp_path / "cache"), "--max-sequence-length", "16", "--index", str(index)])
    assert "imported 2 pairs" in capsys.readouterr().out
    cache = load_cached_preferences(tmp_path / "cache")
    assert torch.equal(cache[0]["chosen_latents"], torch.from_numpy(latents[2]))
    assert torch.equal(cache[1]["rejected_latents"], torch.from_numpy(latents[9]))
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        import_released_data(tmp_path / "nowhere", tiny_sd3_dir, tmp_path / "other")
