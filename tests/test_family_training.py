"""`dina cache` + `dina train` per family on tiny FLUX.1, Qwen-Image and Z-Image generators saved locally: the cache
holds the family's own prompt encoding (pooled for FLUX, the mask of real tokens for Qwen-Image and Z-Image) and VAE
latents, and a few training steps lower the loss."""

import io
import random

import datasets
import pytest
import torch
import transformers
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from modeling_dina import DiNaRewardModel
from modeling_dina.backbones import backbone_for_pipeline
from modeling_dina.tiny_families import TINY_FAMILY_DINA, build_tiny_pipeline
from modeling_dina.training import DiNaTrainer, DiNaTrainingArguments, cache_preference_dataset
from modeling_dina.training.encoders import image_to_pixels

NOUNS = ["cat", "dog", "circle", "square on the mat"]
WORDS = ["a", "red", "blue", *" ".join(NOUNS).split()]
MAX_LENGTH = TINY_FAMILY_DINA["max_sequence_length"]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def png(colour, rng: random.Random) -> bytes:
    """A grey 32x32 image with a red or blue box at a random place."""
    image = PILImage.new("RGB", (32, 32), (128, 128, 128))
    x, y = rng.randint(0, 16), rng.randint(0, 16)
    image.paste(colour, (x, y, x + 14, y + 14))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_pairs(n: int) -> Dataset:
    """Red (chosen) vs blue (rejected), prompts of different lengths."""
    rng = random.Random(0)
    rows = {
        "prompt": [f"a {NOUNS[i % len(NOUNS)]}" for i in range(n)],
        "chosen": [{"bytes": png((220, 40, 40), rng), "path": None} for _ in range(n)],
        "rejected": [{"bytes": png((40, 40, 220), rng), "path": None} for _ in range(n)],
        "label": [1.0] * n,
    }
    features = Features({"prompt": Value("string"), "chosen": Image(), "rejected": Image(), "label": Value("float32")})
    return Dataset.from_dict(rows, features=features)


def train_and_evaluate(model, dataset, output_dir) -> tuple[dict, dict]:
    """Eval metrics on the training pairs before and after 24 steps (the default fidelity loss: 0.293 at a zero
    margin, so its steps are small)."""
    args = DiNaTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        max_steps=24,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        eval_noise_levels=[0.2, 0.5],
    )
    trainer = DiNaTrainer(model, args, train_dataset=dataset, eval_dataset=dataset)
    before = trainer.evaluate()
    trainer.train()
    return before, trainer.evaluate()


def assert_learned(before: dict, after: dict) -> None:
    assert after["eval_loss"] < before["eval_loss"] - 0.005, (before, after)
    assert after["eval_accuracy_ensemble"] >= 0.75, after


@pytest.mark.parametrize("family", ["flux", "qwenimage", "zimage"])
def test_cache_holds_the_family_encoding_and_training_lowers_the_loss(family, tmp_path):
    generator = build_tiny_pipeline(family, WORDS)
    generator.save_pretrained(tmp_path / "base")
    pairs = make_pairs(8)
    cached = cache_preference_dataset(
        pairs, str(tmp_path / "base"), tmp_path / "cache", buckets=[(32, 32)], max_sequence_length=MAX_LENGTH,
        batch_size=4, progress=False,
    )  # fmt: skip
    assert len(cached) == 8 and set(cached.bucket_ids) == {(16, 16)}

    item, row = cached[5], pairs.cast_column("chosen", Image())[5]
    family_cls = backbone_for_pipeline(generator)
    with torch.no_grad():
        expected = family_cls.encode_prompt(generator.components, [row["prompt"]], max_sequence_length=MAX_LENGTH)
        latents = family_cls.encode_pixels(generator.vae, image_to_pixels(row["chosen"], (32, 32))[None])
    torch.testing.assert_close(item["prompt_embeds"], expected.embeds[0])
    torch.testing.assert_close(item["chosen_latents"], latents[0])
    if family == "flux":
        torch.testing.assert_close(item["pooled_prompt_embeds"], expected.pooled[0])
        assert "prompt_embeds_mask" not in item
    else:
        assert torch.equal(item["prompt_embeds_mask"], expected.mask[0]) and "pooled_prompt_embeds" not in item
        lengths = {int(cached[i]["prompt_embeds_mask"].sum()) for i in range(4)}
        assert len(lengths) > 1  # prompts of different lengths keep their own masks

    torch.manual_seed(0)
    model = DiNaRewardModel.from_base(generator.transformer, **TINY_FAMILY_DINA)
    assert_learned(*train_and_evaluate(model, cached, tmp_path / "out"))
