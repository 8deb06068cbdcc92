"""The Shapes world's rewards: DiNa-LRM on the generator's first blocks, its ablations, and a pixel-space baseline.

- `train_dina_reward` trains DiNa-LRM (LoRA + head on the shipped generator's first 2 MMDiT blocks) with the package's
  own `DiNaTrainer` on cached latents of the Shapes preference pairs; `VARIANTS` are the report's ablations
  (constant-variance Thurstone, Bradley-Terry, clean-only training, frozen backbone without LoRA).
- `PixelReward` is a pixel-space reward of comparable trainable size (a small CNN conditioned on the prompt's pooled
  embedding), trained on the same pairs' pixels with Bradley-Terry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..losses import bradley_terry_loss
from ..metrics import pairwise_accuracy
from ..modeling_dina import DiNaRewardModel
from ..noise import NOISE_MODES
from ..training import DiNaTrainer, DiNaTrainingArguments, PreferenceCollator
from .generator import MAX_SEQUENCE_LENGTH

__all__ = [
    "ENSEMBLE_LEVELS",
    "install_reward",
    "EVAL_LEVELS",
    "REWARD_DIR",
    "SHAPES_DINA",
    "VARIANTS",
    "PixelReward",
    "dina_accuracy",
    "load_pixel_reward",
    "pixel_accuracy",
    "save_pixel_reward",
    "train_dina_reward",
    "train_pixel_reward",
]

REWARD_DIR = Path(__file__).parent / "assets" / "reward"
# DiNa-LRM for a 4-block, width-128 generator: its first two blocks, both streams tapped after each.
SHAPES_DINA = dict(
    num_backbone_layers=2,
    visual_layers=[1, 2],
    text_layers=[1, 2],
    lora_rank=16,
    lora_alpha=16,
    head_num_attention_heads=4,
    max_sequence_length=MAX_SEQUENCE_LENGTH,
    noise_level_latents=0.4,
    noise_level_images=0.1,
)
# Each ablation: (DiNaConfig overrides, DiNaTrainingArguments overrides).
VARIANTS: dict[str, tuple[dict, dict]] = {
    "dina": ({}, {}),  # noise-calibrated Thurstone, uniform noise levels, LoRA: the method
    "thurstone_constant": ({}, {"loss_type": "thurstone_constant"}),
    "bradley_terry": ({}, {"loss_type": "bt"}),
    "clean_only": ({}, {"noise_sampling": "constant", "constant_noise_level": 0.0}),
    "frozen_backbone": ({"use_lora": False}, {}),
}
EVAL_LEVELS = (0.1, 0.2, 0.4, 0.5, 0.7, 0.9)
ENSEMBLE_LEVELS = (0.2, 0.5, 0.7)


def train_dina_reward(
    generator_dir: str | os.PathLike,
    train_cache,
    output_dir: str | os.PathLike,
    *,
    variant: str = "dina",
    steps: int = 600,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
) -> DiNaRewardModel:
    """Train one DiNa variant on `train_cache` (a `CachedPreferenceDataset`) and save it to `output_dir`, naming the
    generator by a path relative to it (so the folder and the generator move together)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
    torch.manual_seed(seed)
    model_overrides, training_overrides = VARIANTS[variant]
    model = DiNaRewardModel.from_base(str(generator_dir), **SHAPES_DINA, **model_overrides)
    scratch = tempfile.TemporaryDirectory()  # the Trainer's own output; nothing of it is kept
    args = DiNaTrainingArguments(
        output_dir=scratch.name,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to=[],
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        **training_overrides,
    )
    with scratch:
        DiNaTrainer(model, args, train_dataset=train_cache).train()
    model.eval()
    model.config.base_model_name_or_path = os.path.relpath(generator_dir, output_dir)
    model.save_pretrained(output_dir)
    return model


def install_reward(trained_dir: str | os.PathLike, target: str | os.PathLike = REWARD_DIR) -> Path:
    """Copy a trained Shapes DiNa folder into the package (config + weights; the package brings the code), naming the
    shipped generator beside it as its base."""
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((Path(trained_dir) / "config.json").read_text())
    config["base_model_name_or_path"] = "../generator"
    config.pop("auto_map", None)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(Path(trained_dir) / "model.safetensors", target / "model.safetensors")
    return target


def _noised_rewards(
    model: DiNaRewardModel, batch: dict, levels, generator: torch.Generator, noise: str = "shared"
) -> torch.Tensor:
    """Rewards `(2, B)` of a cached batch at the given noise level(s) (an ensemble when several): one noise draw
    shared by the chosen and the rejected latent, or with `noise="independent"` one draw each."""
    chosen, rejected = batch["chosen_latents"], batch["rejected_latents"]
    draws = 1 if noise == "shared" else 2
    eps = torch.randn((draws, *chosen.shape), generator=generator)
    rewards = model.score_clean(
        torch.cat([chosen, rejected]),
        batch["prompt_embeds"].repeat(2, 1, 1),
        batch["pooled_prompt_embeds"].repeat(2, 1),
        noise=torch.cat([eps[0], eps[-1]]),
        noise_levels=list(levels),
    ).rewards
    return rewards.view(2, -1)


@torch.no_grad()
def dina_accuracy(
    model: DiNaRewardModel, cache, levels, *, batch_size: int = 128, seed: int = 0, noise: str = "shared"
) -> float:
    """Held-out pairwise accuracy of a DiNa model on a cached pair set at one level or an ensemble of levels, with
    the noise draw shared by a pair's two latents (`noise="shared"`) or one draw per latent (`"independent"`)."""
    if noise not in NOISE_MODES:
        raise ValueError(f"`noise` must be one of {NOISE_MODES}, got {noise!r}")
    loader = torch.utils.data.DataLoader(cache, batch_size=batch_size, collate_fn=PreferenceCollator())
    generator = torch.Generator().manual_seed(seed)
    chosen, rejected, labels = [], [], []
    for batch in loader:
        rewards = _noised_rewards(model, batch, levels, generator, noise)
        chosen.append(rewards[0])
        rejected.append(rewards[1])
        labels.append(batch["labels"])
    return pairwise_accuracy(torch.cat(chosen), torch.cat(rejected), torch.cat(labels))["accuracy"]


class PixelReward(nn.Module):
    """A pixel-space reward: a small CNN over the RGB image, FiLM-conditioned on the prompt's pooled embedding."""

    def __init__(self, text_dim: int, width: int = 48):
        super().__init__()
        self.config = {"text_dim": text_dim, "width": width}
        self.convs = nn.ModuleList(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
            for c_in, c_out in [(3, width), (width, 2 * width), (2 * width, 4 * width), (4 * width, 4 * width)]
        )
        self.film = nn.ModuleList(nn.Linear(text_dim, 2 * conv.out_channels) for conv in self.convs)
        self.head = nn.Sequential(nn.Linear(4 * width + text_dim, 4 * width), nn.SiLU(), nn.Linear(4 * width, 1))

    def forward(self, pixels: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """`pixels` (B, 3, H, W) in [-1, 1], `pooled` (B, text_dim) -> rewards (B,)."""
        x = pixels
        for conv, film in zip(self.convs, self.film):
            gamma, beta = film(pooled)[:, :, None, None].chunk(2, dim=1)
            x = F.silu(conv(x) * (1 + gamma) + beta)
        return self.head(torch.cat([x.mean(dim=(2, 3)), pooled], dim=-1)).squeeze(-1)


def save_pixel_reward(model: PixelReward, folder: str | os.PathLike) -> None:
    """`config.json` + `model.safetensors`, read back by `load_pixel_reward`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config))
    save_file(model.state_dict(), folder / "model.safetensors")


def load_pixel_reward(folder: str | os.PathLike) -> PixelReward:
    """A pixel reward written by `save_pixel_reward`, frozen, in eval mode."""
    folder = Path(folder)
    model = PixelReward(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model.eval().requires_grad_(False)


def images_to_pixels(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1]."""
    array = np.stack(
        [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.float32) for im in images]
    )
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1.0


def _pixel_batches(pairs, pooled_by_prompt: dict, batch_size: int, rng: np.random.Generator | None):
    order = rng.permutation(len(pairs)) if rng is not None else np.arange(len(pairs))
    for start in range(0, len(order), batch_size):
        rows = pairs[order[start : start + batch_size]]
        pooled = torch.stack([pooled_by_prompt[p] for p in rows["prompt"]])
        yield images_to_pixels(rows["chosen"]), images_to_pixels(rows["rejected"]), pooled, torch.tensor(rows["label"])


def train_pixel_reward(
    pairs, pooled_by_prompt: dict, *, steps: int = 600, batch_size: int = 32, learning_rate: float = 1e-3, seed: int = 0
) -> PixelReward:
    """Train `PixelReward` with Bradley-Terry on a pair dataset (Shapes schema) and pooled prompt embeddings."""
    torch.manual_seed(seed)
    text_dim = next(iter(pooled_by_prompt.values())).shape[-1]
    model = PixelReward(text_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(seed)
    step, bar = 0, tqdm(total=steps, desc="pixel reward")
    while step < steps:
        for chosen, rejected, pooled, labels in _pixel_batches(pairs, pooled_by_prompt, batch_size, rng):
            rewards = model(torch.cat([chosen, rejected]), torch.cat([pooled, pooled])).view(2, -1)
            loss = bradley_terry_loss(rewards[0], rewards[1], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            bar.update()
            if step == steps:
                break
    bar.close()
    return model.eval()


@torch.no_grad()
def pixel_accuracy(model: PixelReward, pairs, pooled_by_prompt: dict, *, batch_size: int = 256) -> float:
    """Held-out pairwise accuracy of a pixel reward on a pair dataset."""
    chosen, rejected, labels = [], [], []
    for c, r, pooled, label in _pixel_batches(pairs, pooled_by_prompt, batch_size, None):
        chosen.append(model(c, pooled))
        rejected.append(model(r, pooled))
        labels.append(label)
    return pairwise_accuracy(torch.cat(chosen), torch.cat(rejected), torch.cat(labels))["accuracy"]
