"""The shipped Shapes DiNa-LRM: it loads like any Hub model, ranks held-out pairs well above chance, and `dina demo`
writes its contact sheet and picks complying samples of the generator more often than a random pick. Floors are set a
little below what was measured, on seeds the report does not use."""

import json

import torch
from PIL import Image

from modeling_dina import DiNaRewardModel, DiNaRewardPipeline
from modeling_dina.cli import main as dina_main
from modeling_dina.shapes.data import build_preference_dataset
from modeling_dina.shapes.generator import MAX_SEQUENCE_LENGTH, load_generator
from modeling_dina.shapes.render import IMAGE_SIZE
from modeling_dina.shapes.reward import (
    REWARD_DIR,
    PixelReward,
    dina_accuracy,
    load_pixel_reward,
    save_pixel_reward,
)
from modeling_dina.training import cache_preference_dataset

ACCURACY_FLOOR = 0.75  # measured 0.817 at u = 0.2 on these 300 pairs (0.774 on the report's 1000)
# Best-of-4 compliance of the DiNa pick minus a random pick on 128 held-out prompts: measured +0.102 with seed 1
# (+0.148 with seed 2; +0.144 on the report's 320 prompts, seed 0).
BEST_OF_N_GAIN_FLOOR = 0.07
SEED = ["--seed", "1"]


def test_shipped_reward_loads_like_a_hub_model():
    pipe = DiNaRewardPipeline.from_pretrained(REWARD_DIR)
    assert pipe.reward_model.config.base_model_name_or_path == "../generator"
    assert pipe.reward_model.config.num_backbone_layers == 2 and pipe.vae is not None


def test_shipped_reward_held_out_accuracy(tmp_path):
    generator = load_generator()
    pairs = build_preference_dataset({"test": 300}, seed=4242)["test"]
    cache = cache_preference_dataset(
        pairs,
        generator,
        tmp_path / "cache",
        batch_size=100,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        buckets=[(IMAGE_SIZE, IMAGE_SIZE)],
        progress=False,
    )
    model = DiNaRewardModel.from_pretrained(REWARD_DIR)
    assert dina_accuracy(model, cache, [0.2], seed=1) >= ACCURACY_FLOOR
    # At sigma = 1 a latent is its noise alone: a shared draw makes every pair a tie (half credit), one draw per
    # latent does not, and the same seed gives the same draws again.
    assert dina_accuracy(model, cache, [1.0], seed=1) == 0.5
    independent = dina_accuracy(model, cache, [1.0], seed=1, noise="independent")
    assert independent != 0.5 and independent == dina_accuracy(model, cache, [1.0], seed=1, noise="independent")


def test_demo_writes_contact_sheet_and_beats_random(tmp_path, capsys):
    out = tmp_path / "demo"
    dina_main(["demo", "--output", str(out), "--prompts", "3", "--candidates", "4", "--eval-prompts", "128"] + SEED)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] > 3 * 128 and sheet.size[0] > 4 * 128
    result = json.loads((out / "demo.json").read_text())
    assert result["prompts"] == 128 and result["oracle"] >= max(result["dina"], result["random"])
    assert result["dina"] - result["random"] >= BEST_OF_N_GAIN_FLOOR
    assert "DiNa-LRM pick" in capsys.readouterr().out


def test_pixel_reward_round_trip(tmp_path):
    torch.manual_seed(0)
    model = PixelReward(text_dim=8, width=4).eval()
    save_pixel_reward(model, tmp_path / "pixel")
    loaded = load_pixel_reward(tmp_path / "pixel")
    pixels, pooled = torch.rand(2, 3, 64, 64) * 2 - 1, torch.randn(2, 8)
    assert torch.equal(loaded(pixels, pooled), model(pixels, pooled))
    assert not any(p.requires_grad for p in loaded.parameters())
