"""The one path from a file to a reward: `DiNaImageProcessor` decoding, sizes and resizing, and equal rewards for the
same file whether it is cached for training or scored by the pipeline (RGBA, EXIF-rotated and 16-bit files)."""

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from modeling_dina.image_processing_dina import DiNaImageProcessor
from modeling_dina.training.buckets import RELEASED_BUCKETS, released_bucket
from modeling_dina.training.caching import cache_preference_dataset

PROMPT = "a red circle"
FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})


def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _rgba_png(path) -> np.ndarray:
    """A 32x32 RGBA PNG whose transparent pixels hide a saturated colour; returns the RGB it must read as."""
    rgb = _pattern(32, 32, 0)
    alpha = np.full((32, 32, 1), 255, dtype=np.uint8)
    alpha[:, :16] = 0
    rgb[:, :16] = (0, 255, 0)  # hidden under full transparency: must not show
    PILImage.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(path)
    return np.concatenate([np.full((32, 16, 3), 255, dtype=np.uint8), rgb[:, 16:]], axis=1)


def _exif_jpeg(path) -> None:
    """A JPEG stored 24 wide x 32 high with EXIF orientation 6 (rotate 90° clockwise to view): upright 32 x 24."""
    image = PILImage.fromarray(_pattern(32, 24, 1))
    exif = PILImage.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif.tobytes(), quality=95)


def _sixteen_bit_png(path) -> np.ndarray:
    """A 32x32 grey 16-bit PNG using the low byte too; returns its values in [0, 1]."""
    values = np.random.default_rng(2).integers(0, 65536, (32, 32), dtype=np.uint16)
    PILImage.fromarray(values).save(path)
    return values.astype(np.float32) / 65535.0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {name: str(folder / name) for name in ("rgba.png", "exif.jpg", "deep.png", "plain.png", "wide.png")}
    expected_rgba = _rgba_png(paths["rgba.png"])
    _exif_jpeg(paths["exif.jpg"])
    expected_deep = _sixteen_bit_png(paths["deep.png"])
    PILImage.fromarray(_pattern(32, 32, 3)).save(paths["plain.png"])
    PILImage.fromarray(_pattern(24, 32, 4)).save(paths["wide.png"])
    return paths, expected_rgba, expected_deep


def test_decoding_reads_files_upright_composited_and_at_full_depth(files):
    paths, expected_rgba, expected_deep = files
    processor = DiNaImageProcessor(vae_scale_factor=2, patch_size=2, max_patches=8)
    rgba = torch.from_numpy(expected_rgba / 255.0).float().permute(2, 0, 1)
    torch.testing.assert_close(processor.to_tensor(paths["rgba.png"]), rgba)
    deep = processor.to_tensor(paths["deep.png"])
    torch.testing.assert_close(deep, torch.from_numpy(expected_deep).expand(3, -1, -1))
    assert len(torch.unique(deep)) > 256  # not rounded to 8 bits
    with PILImage.open(paths["exif.jpg"]) as stored:
        assert stored.size == (24, 32)
        rotated = np.asarray(stored.transpose(PILImage.Transpose.ROTATE_270), dtype=np.float32) / 255.0
    assert processor.size_of(paths["exif.jpg"]) == (24, 32)  # (height, width) upright, from the header alone
    torch.testing.assert_close(processor.to_tensor(paths["exif.jpg"]), torch.from_numpy(rotated).permute(2, 0, 1))
    with open(paths["rgba.png"], "rb") as f:  # bytes and datasets cells read the same
        data = f.read()
    torch.testing.assert_close(processor.to_tensor(data), processor.to_tensor({"bytes": data, "path": None}))
    palette = PILImage.fromarray(_pattern(8, 8, 5)).convert("P")
    torch.testing.assert_close(processor.to_tensor(palette), processor.to_tensor(palette.convert("RGB")))
    cmyk = PILImage.fromarray(_pattern(8, 8, 6)).convert("CMYK")
    torch.testing.assert_close(processor.to_tensor(cmyk), processor.to_tensor(cmyk.convert("RGB")))


def test_sizes_and_resizing():
    processor = DiNaImageProcessor(vae_scale_factor=8, patch_size=2, max_patches=384)
    assert processor.scoring_size(1000, 750) == (992, 736)  # each side down to a multiple of 16
    assert processor.scoring_size(8000, 4000) == (6144, 3072)  # the position table caps the longer side
    with pytest.raises(ValueError, match="smaller than one latent patch"):
        processor.scoring_size(8, 100)
    pixels = torch.rand(3, 40, 60)
    assert processor.fit(pixels, (40, 60)) is pixels  # a right size is left untouched
    cropped = processor.fit(pixels, (40, 40))  # same height: a pure centre crop, no resampling
    torch.testing.assert_close(cropped, pixels[:, :, 10:50])
    assert processor.fit(pixels, (20, 30), mode="stretch").shape == (3, 20, 30)
    with pytest.raises(ValueError, match="resize mode"):
        processor.fit(pixels, (20, 30), mode="pad")


def test_released_buckets():
    assert sum(len(tier) for tier in RELEASED_BUCKETS.values()) == 13
    assert released_bucket(1.0, 1024 * 1024) == (1024, 1024)
    assert released_bucket(1.0, 700 * 700) == (512, 512)  # below 1024²: the 512² tier
    assert released_bucket(1344 / 768, 1344 * 768) == (1344, 768)
    assert released_bucket(1.0, 255 * 255) is None  # dropped


def test_cached_and_scored_files_get_equal_rewards(files, tiny_sd3_dir, tiny_reward_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    paths, _, _ = files
    pipe, model = tiny_reward_pipe, tiny_reward_pipe.reward_model
    pairs = Dataset.from_dict(
        {
            "prompt": [PROMPT, PROMPT],
            "chosen": [{"path": paths["rgba.png"], "bytes": None}, {"path": paths["exif.jpg"], "bytes": None}],
            "rejected": [{"path": paths["deep.png"], "bytes": None}, {"path": paths["wide.png"], "bytes": None}],
            "label": [1.0, 1.0],
        },
        features=FEATURES,
    )
    cached = cache_preference_dataset(
        pairs,
        tiny_sd3_dir,  # the reward model's base, as `dina cache --base` names it
        tmp_path / "cache",
        buckets=[(32, 32), (32, 24)],  # (width, height): the files' own upright sizes
        max_sequence_length=model.config.max_sequence_length,
        progress=False,
    )
    assert len(cached) == 2
    for row, (chosen, rejected) in enumerate([("rgba.png", "deep.png"), ("exif.jpg", "wide.png")]):
        item = cached[row]
        latents = torch.stack([item["chosen_latents"], item["rejected_latents"]])
        images = [paths[chosen], paths[rejected]]
        torch.testing.assert_close(pipe.encode_images(images), latents, rtol=1e-5, atol=1e-5)
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(row))
        from_cache = model.score_clean(
            latents,
            item["prompt_embeds"].expand(2, -1, -1),
            item["pooled_prompt_embeds"].expand(2, -1),
            noise=noise,
            noise_level=0.3,
        ).rewards
        from_files = pipe(PROMPT, images=images, noise=noise, noise_level=0.3).rewards
        torch.testing.assert_close(from_files, from_cache, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(from_files[0], from_files[1])  # the two files really differ


def test_stretch_keeps_full_depth():
    processor = DiNaImageProcessor()
    ramp = torch.linspace(0, 1, 64 * 64).view(1, 64, 64).expand(3, -1, -1).contiguous()
    out = processor.fit(ramp, (32, 32), mode="stretch")
    assert len(torch.unique(out)) > 256 and out.dtype == torch.float32


def test_to_pil_matches_tensor(files):
    paths, expected_rgba, _ = files
    with open(paths["rgba.png"], "rb") as f:
        image = DiNaImageProcessor().to_pil(f.read())
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), expected_rgba)
