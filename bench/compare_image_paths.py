"""Rewards of the same files read by the training cache and by the reward pipeline, on the shipped Shapes model.

    python bench/compare_image_paths.py

Writes three files made from a Shapes render (an RGBA PNG whose transparent pixels hide other colours, an EXIF-rotated
JPEG, a 16-bit PNG), caches them with `cache_preference_dataset` as a user's `dina cache` would, then scores the
cached latents and the files through `DiNaRewardPipeline` with the same prompt, noise draw and level. With one path
from pixels to latents the two columns agree; the script only uses calls that predate that path, so it can be run
on older commits as well.
"""

from __future__ import annotations

import os
import tempfile

import datasets
import numpy as np
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from modeling_dina.pipeline_dina import DiNaRewardPipeline
from modeling_dina.shapes.generator import GENERATOR_DIR
from modeling_dina.shapes.render import render
from modeling_dina.shapes.reward import REWARD_DIR
from modeling_dina.training.caching import cache_preference_dataset

PROMPT = "two red circles"
FEATURES = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})


def write_files(folder: str) -> dict[str, str]:
    image = np.asarray(render(PROMPT, seed=3), dtype=np.uint8)
    paths = {name: os.path.join(folder, name) for name in ("rgba.png", "exif.jpg", "deep.png")}
    alpha = np.full(image.shape[:2] + (1,), 255, dtype=np.uint8)
    alpha[:, :20] = 0  # transparent strip...
    hidden = image.copy()
    hidden[:, :20] = (0, 0, 255)  # ...hiding a blue that must not show (it reads as white)
    PILImage.fromarray(np.concatenate([hidden, alpha], axis=-1), "RGBA").save(paths["rgba.png"])
    exif = PILImage.Exif()
    exif[0x0112] = 6  # stored rotated; a viewer turns it 90° clockwise
    PILImage.fromarray(image).transpose(PILImage.Transpose.ROTATE_90).save(paths["exif.jpg"], exif=exif.tobytes())
    deep = np.asarray(PILImage.fromarray(image).convert("L"), dtype=np.uint16) * 257
    PILImage.fromarray(deep).save(paths["deep.png"])
    return paths


def main() -> None:
    torch.set_flush_denormal(True)
    datasets.disable_progress_bars()
    pipe = DiNaRewardPipeline.from_pretrained(REWARD_DIR)
    pipe.set_progress_bar_config(disable=True)
    max_length = pipe.reward_model.config.max_sequence_length
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(folder)
        names = list(paths)
        cell = [{"path": paths[n], "bytes": None} for n in names]
        pairs = Dataset.from_dict(
            {"prompt": [PROMPT] * 3, "chosen": cell, "rejected": cell[1:] + cell[:1], "label": [1.0] * 3},
            features=FEATURES,
        )
        cached = cache_preference_dataset(
            pairs,
            GENERATOR_DIR,
            os.path.join(folder, "cache"),
            buckets=[(64, 64)],
            max_sequence_length=max_length,
            progress=False,
        )
        rows = {int(r): i for i, r in enumerate(cached.pairs["row"])}
        latents = torch.stack([cached[rows[i]]["chosen_latents"] for i in range(3)])
        item = cached[0]
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
        from_cache = pipe(
            latents=latents,
            prompt_embeds=item["prompt_embeds"][None].expand(3, -1, -1),
            pooled_prompt_embeds=item["pooled_prompt_embeds"][None].expand(3, -1),
            noise=noise,
            noise_level=0.1,
        ).rewards
        from_files = pipe(PROMPT, images=[paths[n] for n in names], noise=noise, noise_level=0.1).rewards
    print(f"{'file':<10} {'cached -> reward':>17} {'file -> pipeline':>17} {'difference':>11}")
    for name, a, b in zip(names, from_cache.tolist(), from_files.tolist()):
        print(f"{name:<10} {a:>17.4f} {b:>17.4f} {b - a:>11.4f}")


if __name__ == "__main__":
    main()
