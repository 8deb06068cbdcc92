"""Tests for modeling_dina.training.caching: what is stored, buckets, resumption after an interruption, bad rows."""

import io
import json
import logging
import os
import random

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from diffusers import StableDiffusion3Pipeline
from PIL import Image as PILImage
from PIL import ImageDraw

from modeling_dina.tiny_sd3 import save_tiny_sd3_pipeline
from modeling_dina.training import caching
from modeling_dina.training.caching import (
    cache_preference_dataset,
    image_to_pixels,
    load_cached_preferences,
    make_buckets,
    nearest_bucket,
)

PAIR_FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
PROMPTS = ["a red circle", "a blue square", "a green triangle"]


@pytest.fixture(autouse=True)
def _quiet_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny SD3 pipeline whose VAE has a non-trivial shift and scale (so the latent formula is checked)."""
    return save_tiny_sd3_pipeline(tmp_path_factory.mktemp("base"), seed=0, vae_shift_factor=0.1, vae_scaling_factor=1.5)


@pytest.fixture(scope="module")
def pipe(base_dir):
    return StableDiffusion3Pipeline.from_pretrained(base_dir)


def png(color, size, seed=0) -> bytes:
    rng = random.Random(seed)
    image = PILImage.new("RGB", size, (120, 120, 120))
    x, y = rng.randint(4, size[0] - 4), rng.randint(4, size[1] - 4)
    ImageDraw.Draw(image).ellipse([x - 4, y - 4, x + 4, y + 4], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_pairs(n: int, sizes=((32, 32), (40, 24)), bad_rows=()) -> Dataset:
    """Pairs cycling through `PROMPTS` and image `sizes`; rows in `bad_rows` get an undecodable chosen image."""
    rows = {"prompt": [], "chosen": [], "rejected": [], "label": []}
    for i in range(n):
        size = sizes[i % len(sizes)]
        chosen = b"not an image" if i in bad_rows else png((220, 30, 30), size, seed=i)
        rows["prompt"].append(PROMPTS[i % len(PROMPTS)])
        rows["chosen"].append({"bytes": chosen, "path": None})
        rows["rejected"].append({"bytes": png((30, 30, 220), size, seed=100 + i), "path": None})
        rows["label"].append(0.5 if i == 1 else 1.0)
    return Dataset.from_dict(rows, features=PAIR_FEATURES)


def cache(dataset, base, folder, **kwargs):
    kwargs = {"batch_size": 4, "max_sequence_length": 8, "resolution": 28, "shard_size": 4, "progress": False, **kwargs}
    return cache_preference_dataset(dataset, base, folder, **kwargs)


def test_buckets_are_multiples_and_match_aspect_ratio():
    buckets = make_buckets(1024, 16, max_aspect_ratio=2.0)
    assert all(w % 16 == 0 and h % 16 == 0 and 0.5 <= w / h <= 2.0 for w, h in buckets)
    assert (1024, 1024) in buckets
    assert all(abs(w * h - 1024**2) / 1024**2 < 0.1 for w, h in buckets)
    wide, tall = nearest_bucket(1600, 900, buckets), nearest_bucket(900, 1600, buckets)
    assert wide[0] > wide[1] and tall == (wide[1], wide[0])
    assert max(max(b) for b in make_buckets(28, 4, max_side=32)) <= 32
    with pytest.raises(ValueError, match="resolution"):
        make_buckets(8, 16)


def test_cache_stores_vae_latents_and_each_prompt_once(pipe, tmp_path, monkeypatch):
    calls, original = [], StableDiffusion3Pipeline.encode_prompt

    def encode_prompt(self, *args, **kwargs):  # the SD3 family encodes with its own pipeline's method
        calls.append(list(kwargs["prompt"] if "prompt" in kwargs else args[0]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusion3Pipeline, "encode_prompt", encode_prompt)
    pairs = make_pairs(10)
    cached = cache(pairs, pipe, tmp_path / "cache")

    assert len(cached) == 10
    assert sorted(p for batch in calls for p in batch) == sorted(PROMPTS)  # each distinct prompt encoded once
    assert len(cached.prompts) == len(PROMPTS)
    buckets = make_buckets(28, 4, max_side=32)  # tiny VAE factor 2 x patch 2; 8 patches a side at most
    square, wide = nearest_bucket(32, 32, buckets), nearest_bucket(40, 24, buckets)
    assert square == (28, 28) and wide[0] > wide[1]
    assert set(cached.bucket_ids) == {(14, 14), (wide[1] // 2, wide[0] // 2)}  # latent (h, w) = pixels / 2

    item = cached[5]  # a 40x24 pair
    source = pairs.cast_column("chosen", Image())[5]["chosen"]
    with torch.no_grad():
        mean = pipe.vae.encode(image_to_pixels(source, wide)[None]).latent_dist.mean
    torch.testing.assert_close(item["chosen_latents"], ((mean - 0.1) * 1.5)[0])
    assert item["chosen_latents"].shape == item["rejected_latents"].shape == (4, wide[1] // 2, wide[0] // 2)
    assert item["chosen_latents"].dtype == torch.float32

    prompt = PROMPTS[5 % len(PROMPTS)]
    embeds, _, pooled, _ = pipe.encode_prompt(
        [prompt], None, None, do_classifier_free_guidance=False, max_sequence_length=8
    )
    torch.testing.assert_close(item["prompt_embeds"], embeds[0])
    torch.testing.assert_close(item["pooled_prompt_embeds"], pooled[0])
    assert cached[1]["label"] == 0.5
    info = json.loads((tmp_path / "cache" / "cache_info.json").read_text())
    assert info["complete"] and info["num_pairs"] == 10 and info["num_shards"] == 3


def test_interrupted_cache_resumes_at_the_missing_shard(base_dir, tmp_path, monkeypatch):
    pairs = make_pairs(10)
    reference = cache(pairs, base_dir, tmp_path / "reference")

    real_write = caching._write_shard
    written = []

    def interrupt_after_first(*args, **kwargs):
        if written:
            raise KeyboardInterrupt
        written.append(args[2])
        real_write(*args, **kwargs)

    monkeypatch.setattr(caching, "_write_shard", interrupt_after_first)
    with pytest.raises(KeyboardInterrupt):
        cache(pairs, base_dir, tmp_path / "cache")
    assert sorted(os.listdir(tmp_path / "cache" / "shards")) == ["00000"]
    with pytest.raises(ValueError, match="incomplete"):
        load_cached_preferences(tmp_path / "cache")
    first_shard_mtime = os.path.getmtime(tmp_path / "cache" / "shards" / "00000" / "pairs" / "state.json")

    def count(*args, **kwargs):
        written.append(args[2])
        real_write(*args, **kwargs)

    written.clear()
    monkeypatch.setattr(caching, "_write_shard", count)
    resumed = cache(pairs, base_dir, tmp_path / "cache")
    assert [os.path.basename(f) for f in written] == ["00001", "00002"]
    assert os.path.getmtime(tmp_path / "cache" / "shards" / "00000" / "pairs" / "state.json") == first_shard_mtime
    assert len(resumed) == len(reference) == 10
    for i in range(10):
        for key, value in reference[i].items():
            torch.testing.assert_close(resumed[i][key], value)
    with pytest.raises(ValueError, match="other settings.*max_sequence_length"):
        cache(pairs, base_dir, tmp_path / "cache", max_sequence_length=6)
    monkeypatch.setattr(caching, "load_encoders", lambda *a, **k: pytest.fail("a complete cache loads no encoders"))
    assert len(cache(pairs, base_dir, tmp_path / "cache")) == 10


def test_unreadable_images_are_reported_and_skipped(base_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="modeling_dina.training.caching"):
        cached = cache(make_pairs(8, bad_rows=(2, 5)), base_dir, tmp_path / "cache")
    assert len(cached) == 6
    assert list(cached.pairs["row"]) == [0, 1, 3, 4, 6, 7]
    skipped = json.loads((tmp_path / "cache" / "skipped_rows.json").read_text())
    assert [(s["row"], s["column"]) for s in skipped] == [(2, "chosen"), (5, "chosen")]
    assert all("UnidentifiedImageError" in s["error"] for s in skipped)
    messages = [r.getMessage() for r in caplog.records]
    assert any("row 2" in m and "chosen" in m for m in messages) and any("row 5" in m for m in messages)
    assert any("2 of 8 rows were skipped" in m for m in messages)


def test_single_bucket_and_storage_dtype(base_dir, tmp_path):
    cached = cache(make_pairs(4), base_dir, tmp_path / "cache", buckets=[(32, 32)], storage_dtype="float16")
    assert set(cached.bucket_ids) == {(16, 16)}
    assert cached.pairs.features["chosen_latents"].feature.dtype == "float16"
    assert cached.prompts.features["prompt_embeds"].dtype == "float16"
    assert np.isfinite(cached[0]["prompt_embeds"].float().numpy()).all()
    with pytest.raises(ValueError, match="multiples of 4"):
        cache(make_pairs(4), base_dir, tmp_path / "other", buckets=[(30, 32)])
